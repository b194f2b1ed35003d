"""Upgrading the resident engine without a gap (``transport/handover.py``), with real processes.

A burst of real ADDs and DELs goes through the ``route-tune`` executable (the native forwarder) in
``resident`` mode, where a request that found no engine would be a visible code-11 failure and an
in-process run is impossible, while a second engine takes the socket over, or while the engine is
SIGKILLed and restarted. The farm (3 pods x 2 rails, macvlan links made once) is shared by the
module; every test has its own socket, state and logs. The server's test trace (one line per run:
pid, command, attachment) shows which engine ran what, and that nothing ran twice.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from cniplugin.lab.runtime import PluginEnv, PyRuntime
from cniplugin.protocol import dispatch as _dispatch
from cniplugin.transport import handover as _handover
from cniplugin.transport import shim as _shim
from harness.host import require_root, run_plugin, wait_until
from harness.lab import NAMES, Farm
from harness.resident import Resident, plugin_log, served_count
from harness.snapshot import assert_same, snapshot

pytestmark = pytest.mark.netns

PODS, RAILS = 3, 2


@pytest.fixture(scope="module")
def farm(lab_session, tmp_path_factory):
    """The farm and each attachment's prevResult (its macvlan + static IPAM step, run once)."""
    require_root("ip")
    with Farm(NAMES.next(), rails=RAILS, pods=PODS) as f:
        penv = PluginEnv(tmp_path_factory.mktemp("prep"), family="4")
        runtime = PyRuntime(f.node, penv)
        prevs = {}
        for i in range(PODS):
            for k in range(1, RAILS + 1):
                conflist = f.conflist(i, k)
                prevs[i, k] = runtime.invoke("ADD", conflist["plugins"][0], conflist, None,
                                             f"/run/netns/{f.pod(i)}", f"net{k}", f"pod{i}")
        yield f, prevs


class Burst:
    """Every attachment ADDed and DELed in turn through the real executable, all at once, until
    ``stop()``; each call is recorded as (attachment, command, start, end, reply)."""

    def __init__(self, f: Farm, prevs: dict, penv: PluginEnv) -> None:
        self.f, self.prevs, self.penv = f, prevs, penv
        self.calls: list[tuple[tuple[int, int], str, float, float, object]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._churn, args=(a,)) for a in prevs]

    def __enter__(self) -> Burst:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def wait_calls(self, n: int) -> None:
        wait_until(lambda: len(self.calls) >= n, what=f"{n} calls")

    def _churn(self, attachment: tuple[int, int]) -> None:
        rounds = 0
        while True:
            ok = [self._call(attachment, command) for command in ("ADD", "DEL")]
            rounds += 1
            # End on a DEL that worked, so the node and the pods are as they were.
            if self._stop.is_set() and rounds >= 2 and ok[1]:
                return

    def _call(self, attachment: tuple[int, int], command: str) -> bool:
        i, k = attachment
        conflist = self.f.conflist(i, k)
        conf = {**conflist["plugins"][-1], "name": conflist["name"],
                "cniVersion": conflist["cniVersion"], "prevResult": self.prevs[attachment]}
        env = {**self.penv.env, "CNI_COMMAND": command, "CNI_CONTAINERID": f"pod{i}",
               "CNI_NETNS": f"/run/netns/{self.f.pod(i)}", "CNI_IFNAME": f"net{k}",
               "CNI_PATH": self.penv.cni_path, "CNI_ARGS": ""}
        start = time.monotonic()
        proc = run_plugin(env, conf, netns=self.f.node)
        self.calls.append((attachment, command, start, time.monotonic(), proc))
        return proc.returncode == 0


def _engines(f: Farm, tmp: Path, successor: str) -> tuple[Path, PluginEnv, Resident, Resident, dict]:
    """A serving engine and its successor (not started) on a fresh socket, state and log dir;
    their shared trace file, the PluginEnv, and the farm's state before any call."""
    trace = tmp / "trace"
    penv = PluginEnv(tmp / "penv", family="4", env={"ROUTE_TUNE_ENGINE": "resident"})
    old = Resident(f.node, penv, {"ROUTE_TUNE_SERVER_TEST_TRACE": str(trace)})
    penv.env.update(old.env)
    before = _states(f)
    old.start()
    return trace, penv, old, old.successor(successor), before


def _trace(path: Path) -> list[tuple[str, int, int, str, str]]:
    """(what, monotonic ns, pid, command, attachment) per line of the server's test trace."""
    out = []
    for line in path.read_text().splitlines():
        what, _, ts, pid, command, attachment = line.split()
        out.append((what, int(ts), int(pid), command, attachment))
    return out


def _ran(trace: list) -> Counter:
    """How many times each (attachment, command, n-th such call) entered an engine."""
    seen: Counter = Counter()
    runs: Counter = Counter()
    for what, _, _, command, attachment in sorted(trace, key=lambda e: e[1]):
        if what == "enter":
            seen[attachment, command] += 1
            runs[attachment, command, seen[attachment, command]] += 1
    return runs


def _states(f: Farm) -> dict:
    """The whole state of the farm's node and pods (``harness.snapshot.snapshot``)."""
    return snapshot(f, namespaces=[f.node] + [f.pod(i) for i in range(PODS)])


def _failure(proc) -> str:
    return f"exit {proc.returncode}: {proc.stdout.decode(errors='replace')[:500]}"


def test_burst_across_a_handover(farm, tmp_path):
    """Every call succeeds; the old engine served some, handed over, finished and exited 0; the
    new one served the rest; every call ran exactly once and none in-process
    (bench/handover.py measures the gap)."""
    f, prevs = farm
    trace, penv, old, new, before = _engines(f, tmp_path, "successor")
    try:
        with Burst(f, prevs, penv) as burst:
            burst.wait_calls(12)
            new.start()
            wait_until(lambda: old.proc.poll() is not None, what="the old engine to exit")
            handed = len(burst.calls)
            burst.wait_calls(handed + 12)
        assert old.proc.returncode == 0, old.log()[-3000:]
        assert new.serving()
    finally:
        new.stop()
        old.stop()
    failed = [_failure(c[4]) for c in burst.calls if c[4].returncode != 0]
    assert not failed, "\n".join(failed)
    entries = _trace(trace)
    pids = Counter(pid for what, _, pid, _, _ in entries if what == "enter")
    assert set(pids) == {old.pid, new.pid} and min(pids.values()) > 0, pids
    runs = _ran(entries)
    assert set(runs.values()) == {1}, [r for r, n in runs.items() if n > 1]
    assert sum(runs.values()) == len(burst.calls) == served_count(penv)
    assert "served in-process" not in plugin_log(penv)
    assert "taken over from the running engine" in new.log()
    assert_same(before, _states(f), "the farm after the burst")


def test_burst_across_sigkill_and_restart(farm, tmp_path):
    """SIGKILL mid-burst, then a restart on the stale socket: every call succeeds except code 11
    for the calls the outage cut (in flight at the kill, or made before the restart served)."""
    f, prevs = farm
    trace, penv, old, new, before = _engines(f, tmp_path, "restarted")
    try:
        with Burst(f, prevs, penv) as burst:
            burst.wait_calls(12)
            killed = time.monotonic()
            old.kill()
            new.start()
            restarted = time.monotonic()
            burst.wait_calls(len(burst.calls) + 12)
        assert "stale socket replaced" in new.log()
    finally:
        new.stop()
        old.stop()
    ok = [c for c in burst.calls if c[4].returncode == 0]
    for _, command, start, end, proc in burst.calls:
        if proc.returncode == 0:
            continue
        assert proc.returncode == 1 and json.loads(proc.stdout)["code"] == 11, _failure(proc)
        assert start < restarted and end > killed, f"{command} outside the outage: {_failure(proc)}"
    runs = _ran(_trace(trace))
    assert set(runs.values()) == {1}, [r for r, n in runs.items() if n > 1]
    assert len(ok) <= sum(runs.values()) <= len(burst.calls)
    assert "served in-process" not in plugin_log(penv)
    assert_same(before, _states(f), "the farm after the burst")


# ------------------------------------------------------------------ races and refusals


def _version(server: Resident, request_id: str):
    return _shim.forward(server.request_env(CNI_COMMAND="VERSION", CNI_CONTAINERID=request_id,
                                            ROUTE_TUNE_ENGINE="resident"), b"")


def test_two_successors_racing_exactly_one_serves(tmp_path):
    """Two new engines start at once while requests flow: they take over one after the other
    (the takeover lock), every request is answered exactly once, and one engine is left serving;
    the others exited 0."""
    require_root("ip")
    trace = tmp_path / "trace"
    old = Resident(None, PluginEnv(tmp_path), {"ROUTE_TUNE_SERVER_TEST_TRACE": str(trace),
                                               "ROUTE_TUNE_SERVER_TEST_DELAY": "0.02"}).start()
    racers = [old.successor(f"racer{n}") for n in range(2)]
    replies: list = []
    stop = threading.Event()

    def client(n: int) -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            replies.append(_version(old, f"c{n}-{seq}"))

    clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    engines = [old, *racers]
    try:
        for thread in clients:
            thread.start()
        for racer in racers:
            racer.launch()

        def settled() -> bool:
            return sum(e.proc.poll() is None for e in engines) == 1 and \
                any(e.serving() for e in racers)

        wait_until(settled, what="one engine left serving")
        stop.set()
        for thread in clients:
            thread.join()
        winner = next(e for e in engines if e.proc.poll() is None)
        assert winner in racers and winner.alive()
        assert [e.proc.returncode for e in engines if e is not winner] == [0, 0]
    finally:
        stop.set()
        for engine in engines:
            engine.stop()
    assert replies and all(r == (0, _dispatch.version_reply(), b"") for r in replies)
    entered = Counter(line.split()[5] for line in trace.read_text().splitlines()
                      if line.startswith("enter") and "-/-" not in line)  # not alive()'s
    assert len(entered) == len(replies) and set(entered.values()) == {1}


def test_unconfirmed_handover_resumes_serving(tmp_path):
    """A successor that takes the socket and dies before confirming: the engine serves on."""
    require_root("ip")
    eng = Resident(None, PluginEnv(tmp_path)).start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(str(eng.sock))
            conn.sendall(_handover.REQUEST)
            data, fds, _, _ = socket.recv_fds(conn, 4, 1)
            assert data == _handover.GRANT and len(fds) == 1
            for fd in fds:
                socket.socket(fileno=fd).close()
        wait_until(lambda: "handover not confirmed" in eng.log(),
                   what="the engine to see the successor gone")
        assert eng.alive() and eng.serving()
    finally:
        assert eng.stop() == 0
