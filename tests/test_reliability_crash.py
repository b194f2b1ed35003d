"""Crash anywhere (issue 8): SIGKILL route-tune at every step of ADD; DEL then returns pod and node
to exactly their state before ADD, and a fresh ADD converges.

The test-only fault hook (``cniplugin/_faults.py``) names every step: ``ROUTE_TUNE_FAULT_LOG``
records the points a clean ADD passes, ``ROUTE_TUNE_FAULT_AT=N`` acts at the N-th, with
``ROUTE_TUNE_FAULT_ACTION=kill`` (SIGKILL: nothing after it runs, no rollback) or ``raise`` (the
normal rollback runs). Points sit right AFTER each kernel change, so a kill always leaves a
half-applied attachment behind for DEL to clean.

Engine modes. The hook reads the environment of the process running the engine. In-process that
is the plugin process, so every point is swept with SIGKILL (and with ``raise``: ADD's own
rollback must leave nothing, before any DEL). In resident mode a kill kills the SERVER: a handful
of points are swept by starting the server with the fault variables, letting it die mid-ADD (the
shim answers code 11), restarting it over the stale socket, and running DEL / ADD / DEL through
the new server. Every point with SIGKILL and ``raise`` in resident mode, the dual-stack pod, the
second rail (shared objects already present) and kills during DEL run with ``--run-slow``.

What "exactly before" means: the whole pod and node state (rules both families, every table,
links, configured neighbours, sysctls, nft ruleset) and every file under the state dir.
"""

from __future__ import annotations

import signal

import pytest

from reliability_fixtures import *  # noqa: F401,F403
from reliability_fixtures import Resident

pytestmark = [pytest.mark.netns]
KILL = {"ROUTE_TUNE_FAULT_ACTION": "kill"}
RAISE = {"ROUTE_TUNE_FAULT_ACTION": "raise"}


def ok(reply) -> None:
    assert reply.code == 0, str(reply)


class Sweep:
    """A 2-rail pod (interfaces attached, route-tune not yet) and the states around rail k's ADD."""

    def __init__(self, rig, k: int, recover_env: dict | None = None) -> None:
        self.rig, self.k = rig, k
        self.recover_env = recover_env or {}
        bare = rig.bare()
        self.prevs = {j: bare.add(j) for j in range(1, rig.lab.rails + 1)}
        for j in range(1, k):  # the rails before k are configured: their shared objects exist
            ok(rig.rt("ADD", j, self.prevs[j]))
        self.pre = rig.snapshot()
        self.points = self.count("ADD")
        self.post = rig.snapshot()
        ok(rig.rt("DEL", k, self.prev))
        rig.assert_unchanged(self.pre, "after a clean ADD + DEL")

    @property
    def prev(self) -> dict:
        return self.prevs[self.k]

    def count(self, command: str) -> list[str]:
        """Run ``command`` cleanly with ``ROUTE_TUNE_FAULT_LOG`` in the REQUEST's environment; the
        points it passed. A resident server must ignore a request's fault variables (they are
        read from the server's own environment only), so there the log must not even appear."""
        log = self.rig.lab.tmp / "fault-points.log"
        log.unlink(missing_ok=True)
        ok(self.rig.rt(command, self.k, self.prev, extra_env={"ROUTE_TUNE_FAULT_LOG": str(log)}))
        if self.rig.engine == "resident":
            assert not log.exists(), "a request's ROUTE_TUNE_FAULT_LOG reached the resident engine"
            return []
        points = log.read_text().splitlines() if log.exists() else []
        assert points, "the fault hook recorded no point: is ROUTE_TUNE_FAULT_LOG wired?"
        return points

    def diff(self, want: dict) -> str:
        return snapshot_diff(want, self.rig.snapshot())

    def recover(self, command: str):
        """DEL / fresh ADD after a fault (through ``recover_env``'s engine when given)."""
        return self.rig.rt(command, self.k, self.prev, extra_env=self.recover_env)


def kill_sweep(s: Sweep, numbers: list[int]) -> list[str]:
    """For each N: ADD killed at point N, DEL, compare; fresh ADD, compare; DEL, compare."""
    problems = []
    for n in numbers:
        where = f"kill at point {n} ({s.points[n - 1]})"
        reply = s.rig.rt("ADD", s.k, s.prev, extra_env={**KILL, "ROUTE_TUNE_FAULT_AT": str(n)})
        assert reply.code == -signal.SIGKILL and reply.stdout == b"", f"{where}: not killed:\n{reply}"
        problems += check_cycle(s, where)
    return problems


def check_cycle(s: Sweep, where: str) -> list[str]:
    """DEL -> pre; ADD -> post (converges); DEL -> pre. Returns the problems found."""
    problems = []
    reply = s.recover("DEL")
    if reply.code != 0:
        return [f"{where}: DEL failed:\n{reply}"]
    if diff := s.diff(s.pre):
        problems.append(f"{where}: DEL left:\n{diff}")
    reply = s.recover("ADD")
    if reply.code != 0:
        return problems + [f"{where}: fresh ADD failed:\n{reply}"]
    if diff := s.diff(s.post):
        problems.append(f"{where}: fresh ADD did not converge:\n{diff}")
    ok(s.recover("DEL"))
    if diff := s.diff(s.pre):
        problems.append(f"{where}: final DEL left:\n{diff}")
    return problems


def raise_sweep(s: Sweep) -> list[str]:
    """For each N: ADD fails at point N (raise): the failed ADD alone leaves exactly ``pre``."""
    problems = []
    for n, name in enumerate(s.points, 1):
        reply = s.rig.rt("ADD", s.k, s.prev, extra_env={**RAISE, "ROUTE_TUNE_FAULT_AT": str(n)})
        if reply.code != 1 or "injected fault" not in reply.stdout.decode():
            problems.append(f"raise at point {n} ({name}): want an error reply, got:\n{reply}")
        if diff := s.diff(s.pre):
            problems.append(f"raise at point {n} ({name}): rollback left (before any DEL):\n{diff}")
            ok(s.rig.rt("DEL", s.k, s.prev))
    return problems


# ---------------------------------------------------------------------------- in-process

INPROCESS = pytest.mark.parametrize("engine", ["inprocess"], indirect=True)


@INPROCESS
def test_kill_at_every_point_of_the_first_rail(make_rig):
    """SIGKILL of the plugin process at every fault point of net1's ADD (IPv4; it creates the pod's
    and the node's shared objects too); after each: DEL == before, fresh ADD == a clean ADD, DEL ==
    before. To fit CI, the recovery calls go to a resident engine on the same node (``auto`` mode
    after a server start: the realistic mix); ``--run-slow`` repeats it all in-process."""
    rig = make_rig("4", rails=2)
    helper = Resident(rig.lab.node, rig.penv).start()
    try:
        s = Sweep(rig, k=1, recover_env={"ROUTE_TUNE_ENGINE": "resident",
                                         "ROUTE_TUNE_SOCKET": str(helper.sock)})
        problems = kill_sweep(s, list(range(1, len(s.points) + 1)))
    finally:
        assert helper.stop() == 0, helper.log()[-2000:]
    assert served_count(rig.penv) > 0
    assert not problems, "\n\n".join(problems)


@pytest.mark.slow
@INPROCESS
def test_kill_at_every_point_of_the_first_rail_all_inprocess(make_rig):
    """The same sweep with every call in-process."""
    s = Sweep(make_rig("4", rails=2), k=1)
    problems = kill_sweep(s, list(range(1, len(s.points) + 1)))
    assert not problems, "\n\n".join(problems)


@INPROCESS
def test_failure_at_every_point_rolls_back(make_rig):
    """ADD fails (raise) at every fault point of net1's ADD: its own rollback restores the exact
    pre-ADD state, before any DEL."""
    s = Sweep(make_rig("4", rails=2), k=1)
    problems = raise_sweep(s)
    assert not problems, "\n\n".join(problems)


@pytest.mark.slow
@INPROCESS
@pytest.mark.parametrize("family,k", [("4", 2), ("dual", 1), ("dual", 2)])
def test_kill_sweep_more_shapes(make_rig, family, k):
    """The kill sweep for the second rail (shared objects already there: DEL must keep them) and
    for a dual-stack pod; plus the raise sweep of the same ADD."""
    s = Sweep(make_rig(family, rails=2), k=k)
    problems = kill_sweep(s, list(range(1, len(s.points) + 1))) + raise_sweep(s)
    assert not problems, "\n\n".join(problems)


@pytest.mark.slow
@INPROCESS
def test_kill_at_every_point_of_del(make_rig):
    """SIGKILL at every fault point of DEL: a retried DEL finishes, the state is as before ADD,
    and ADD works again."""
    s = Sweep(make_rig("dual", rails=2), k=1)
    ok(s.rig.rt("ADD", s.k, s.prev))
    del_points = s.count("DEL")
    problems = []
    for n in range(1, len(del_points) + 1):
        ok(s.rig.rt("ADD", s.k, s.prev))
        reply = s.rig.rt("DEL", s.k, s.prev, extra_env={**KILL, "ROUTE_TUNE_FAULT_AT": str(n)})
        assert reply.code == -signal.SIGKILL, f"DEL point {n}: not killed:\n{reply}"
        reply = s.rig.rt("DEL", s.k, s.prev)
        if reply.code != 0:
            problems.append(f"DEL killed at {n} ({del_points[n - 1]}): retried DEL failed:\n{reply}")
        elif diff := s.diff(s.pre):
            problems.append(f"DEL killed at {n} ({del_points[n - 1]}): retried DEL left:\n{diff}")
    assert not problems, "\n\n".join(problems)


# ---------------------------------------------------------------------------- resident

RESIDENT = pytest.mark.parametrize("engine", ["resident"], indirect=True)


def faulty_server(rig, env: dict[str, str]) -> Resident:
    """Replace the rig's server by one whose OWN environment carries the fault variables."""
    rig.server.stop()
    rig.server = Resident(rig.lab.node, rig.penv, extra_env=env).start()
    return rig.server


def healthy_server(rig) -> None:
    rig.server.stop()
    rig.server = Resident(rig.lab.node, rig.penv).start()


def resident_points(rig, s_k: int, prev: dict) -> list[str]:
    log = rig.lab.tmp / "fault-points.log"
    log.unlink(missing_ok=True)
    faulty_server(rig, {"ROUTE_TUNE_FAULT_LOG": str(log)})
    ok(rig.rt("ADD", s_k, prev))
    ok(rig.rt("DEL", s_k, prev))
    healthy_server(rig)
    return [p for p in log.read_text().splitlines() if not p.startswith("del:")]


def server_kill_sweep(rig, s: Sweep, numbers: list[int]) -> list[str]:
    problems = []
    for n in numbers:
        where = f"server killed at point {n} ({s.points[n - 1]})"
        server = faulty_server(rig, {**KILL, "ROUTE_TUNE_FAULT_AT": str(n)})
        reply = rig.rt("ADD", s.k, s.prev)
        assert_cni_error(reply, 11)  # the shim: the engine took the request and died
        server.proc.wait()
        assert server.proc.returncode == -signal.SIGKILL, f"{where}: {server.log()[-2000:]}"
        healthy_server(rig)  # over the stale socket the dead server left behind
        problems += check_cycle(s, where)
    return problems


@RESIDENT
def test_server_killed_mid_add_then_del_cleans(make_rig):
    """The resident server is SIGKILLed at the first kernel change, in the middle, at the first
    node change and after the state is marked applied; the shim answers code 11, a restarted
    server takes over the stale socket, DEL == before, fresh ADD converges, DEL == before."""
    rig = make_rig("4", rails=2)
    s = Sweep(rig, k=1)
    s.points = names = resident_points(rig, 1, s.prev)
    first_pod = next(i for i, p in enumerate(names, 1) if p.startswith("pod:"))
    first_node = next(i for i, p in enumerate(names, 1) if p.startswith("node:"))
    numbers = sorted({first_pod, (first_pod + first_node) // 2, first_node, len(names)})
    problems = server_kill_sweep(rig, s, numbers)
    assert not problems, "\n\n".join(problems)


@pytest.mark.slow
@RESIDENT
def test_server_killed_or_failing_at_every_point(make_rig):
    """Every point, resident: the server SIGKILLed (then restarted) and the server raising."""
    rig = make_rig("4", rails=2)
    s = Sweep(rig, k=1)
    s.points = resident_points(rig, 1, s.prev)
    problems = server_kill_sweep(rig, s, list(range(1, len(s.points) + 1)))
    for n, name in enumerate(s.points, 1):
        faulty_server(rig, {**RAISE, "ROUTE_TUNE_FAULT_AT": str(n)})
        reply = rig.rt("ADD", s.k, s.prev)
        if reply.code != 1 or "injected fault" not in reply.stdout.decode():
            problems.append(f"raise at {n} ({name}): want an error reply, got:\n{reply}")
        if diff := s.diff(s.pre):
            problems.append(f"raise at {n} ({name}): rollback left:\n{diff}")
    healthy_server(rig)
    assert not problems, "\n\n".join(problems)
