"""The resident engine (``cni-route-tune serve``) and the forwarding shim, end to end.

Every test talks to a real server subprocess over a real unix socket. Root is needed (SO_PEERCRED
refusal, netns fds); without root the tests skip, unless env ``CI`` is set, where they fail.
"""

from __future__ import annotations

import array
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from cniplugin.protocol import dispatch as _protocol
from cniplugin.transport.plugin import serve_request
from cniplugin.lab.runtime import PluginEnv
from cniplugin.transport import shim as _shim
from harness.host import require_root, run_plugin, wait_until
from harness.resident import Resident, server_cmd

pytestmark = pytest.mark.netns


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root("ip")


def serve(base: Path, extra_env: dict[str, str] | None = None) -> Resident:
    """A server subprocess in this netns on a private socket under ``base``."""
    return Resident(None, PluginEnv(base), extra_env).start()


@pytest.fixture
def workdir():
    # Not tmp_path: the non-root test needs a path uid 65534 can traverse.
    path = Path(tempfile.mkdtemp(prefix="rtE-srv-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server(workdir):
    eng = serve(workdir)
    yield eng
    eng.stop()


@pytest.fixture
def netns(make_netns):
    """Factory of fresh named netns (the harness's); their paths; all deleted afterwards."""
    return lambda: f"/var/run/netns/{make_netns('srv')}"


def _inprocess(env: dict[str, str], stdin: bytes) -> tuple[int, bytes, bytes]:
    out = serve_request(env, stdin)
    return out.exit_code, out.stdout, out.stderr


ADD_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "net1",
           "CNI_PATH": "/opt/cni/bin", "CNI_NETNS": "/var/run/netns/rtE-absent"}


# ------------------------------------------------------------------ same reply either way


@pytest.mark.parametrize("env,stdin", [
    ({"CNI_COMMAND": "VERSION"}, b""),
    ({"CNI_COMMAND": ""}, b""),
    ({"CNI_COMMAND": "ADD"}, b"{}"),  # missing env: code 4
    (ADD_ENV, b"{not json"),  # code 6
    (ADD_ENV, b'{"cniVersion": "0.4.0"}'),  # no name: code 7
    (ADD_ENV, b'{"cniVersion": "9.9.9", "name": "n"}'),  # code 1
], ids=["version", "about", "missing-env", "bad-json", "no-name", "bad-version"])
def test_reply_identical_to_inprocess(server, env, stdin):
    assert _shim.forward(server.request_env(**env), stdin) == \
        _inprocess(server.request_env(**env), stdin)


def test_plugin_executable_same_both_ways(server):
    """The ``route-tune`` executable: resident and in-process print the same bytes."""
    base = {**server.request_env(**ADD_ENV)}
    for stdin in (b"{not json", b""):
        replies = []
        for mode in ("resident", "inprocess"):
            proc = run_plugin({**os.environ, **base, "ROUTE_TUNE_ENGINE": mode}, stdin)
            replies.append((proc.returncode, proc.stdout))
        assert replies[0] == replies[1]
    version = run_plugin({**os.environ, **server.request_env(CNI_COMMAND="VERSION"),
                          "ROUTE_TUNE_ENGINE": "resident"})
    assert (version.returncode, version.stdout) == (0, _protocol.version_reply())


def test_served_requests_are_logged(server):
    _shim.forward(server.request_env(CNI_COMMAND="VERSION"), b"")
    server.stop()
    assert "served via resident engine" in server.log()


# ------------------------------------------------------------------ no server


def test_resident_without_server_is_code_11(workdir):
    env = {"ROUTE_TUNE_SOCKET": str(workdir / "nothing.sock"), "ROUTE_TUNE_ENGINE": "resident",
           "CNI_COMMAND": "ADD"}
    code, out, err = _shim.forward(env, b'{"cniVersion": "0.4.0", "prevResult": '
                                        b'{"cniVersion": "1.0.0"}, "name": "n"}')
    reply = json.loads(out)
    assert code == 1 and reply["code"] == 11 and reply["cniVersion"] == "0.4.0"


def test_auto_without_server_falls_back(workdir):
    env = {"ROUTE_TUNE_SOCKET": str(workdir / "nothing.sock"), "CNI_COMMAND": "VERSION"}
    assert _shim.forward(env, b"") is None
    proc = run_plugin({**os.environ, **env})
    assert (proc.returncode, proc.stdout) == (0, _protocol.version_reply())


def test_inprocess_mode_never_connects(server):
    env = server.request_env(CNI_COMMAND="VERSION", ROUTE_TUNE_ENGINE="inprocess")
    assert _shim.forward(env, b"") is None


def test_stale_socket_replaced_live_one_handed_over(workdir):
    """A dead engine's socket is replaced; a live engine hands its socket to a second one and
    exits 0 (tests/kernel/test_handover.py has the handover under load)."""
    sock = workdir / "run" / "engine.sock"
    sock.parent.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()  # bound, never listening: connect is refused
    eng = serve(workdir)
    second = eng.successor("second")
    try:
        assert eng.alive()
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        second.start()
        assert eng.proc.wait() == 0 and second.alive()
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
    finally:
        assert second.stop() == 0
        eng.stop()
    assert "stale socket replaced" in eng.log() and "handed over" in eng.log()


def test_not_a_socket_is_left_alone(workdir):
    sock = workdir / "run" / "engine.sock"
    sock.parent.mkdir(mode=0o700)
    sock.write_text("operator's file")
    proc = subprocess.run(server_cmd(sock), env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                                 "ROUTE_TUNE_DEFAULTS": str(workdir / "none.json")},
                          capture_output=True)
    assert proc.returncode == 1 and b"exists and is not a socket" in proc.stderr
    assert sock.read_text() == "operator's file"


# ------------------------------------------------------------------ hostile peers


def _raw(server: Resident, payload: bytes, fds: list[int] | None = None,
         shut: bool = True) -> bytes:
    """Send raw bytes (+fds) and return everything the server answers until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(server.sock))
        try:
            if fds:
                sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                          array.array("i", fds).tobytes())])
            else:
                sock.sendall(payload)
            if shut:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass  # the server closed with our unread bytes queued: its reply came first
        return b"".join(chunks)


def _error_code(frame: bytes) -> int:
    assert frame[:4] == _shim.MAGIC and frame[4] == 1, frame
    out_len = int.from_bytes(frame[5:9], "big")
    return json.loads(frame[13:13 + out_len])["code"]


def _header(flags: int, env_len: int, stdin_len: int) -> bytes:
    return _shim.MAGIC + bytes((flags,)) + env_len.to_bytes(4, "big") + stdin_len.to_bytes(4, "big")


def test_garbage_gets_mismatch(server):
    reply = _raw(server, os.urandom(64).replace(b"R", b"x"))
    assert reply[:4] == _shim.MISMATCH
    assert server.alive()


def test_other_protocol_version_runs_nothing(server):
    assert _raw(server, b"RTE\x07" + bytes(9))[:4] == _shim.MISMATCH
    assert server.alive()


def test_shim_falls_back_on_mismatch(workdir):
    """A server of another protocol version: auto falls back, resident is code 11."""
    path = workdir / "other.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()

    def answer() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"RTE\x02" + bytes(9))

    thread = threading.Thread(target=answer)
    thread.start()
    env = {"ROUTE_TUNE_SOCKET": str(path), "CNI_COMMAND": "VERSION"}
    assert _shim.forward(env, b"") is None
    code, out, _ = _shim.forward({**env, "ROUTE_TUNE_ENGINE": "resident"}, b"")
    assert code == 1 and json.loads(out)["code"] == 11
    thread.join()
    listener.close()


@pytest.mark.parametrize("payload", [
    _shim.MAGIC + b"\x00\x00",  # truncated header
    _header(0, 100, 0) + b"CNI_COMMAND=VERSION\0",  # truncated body
    _header(0, 0xFFFFFFFF, 0xFFFFFFFF),  # huge lengths
    _header(0, 0, 8 << 20) + b"{}",  # stdin over the limit
    _header(0x80, 0, 0),  # unknown flag
    _header(0, 5, 0) + b"CNI_C",  # env block not NUL-terminated
    _header(0, 4, 0) + b"abc\0",  # env entry without '='
    _header(1, 0, 0),  # announces an fd, sends none
], ids=["short-header", "short-body", "huge", "oversize-stdin", "flag", "env-nul", "env-eq",
        "missing-fd"])
def test_malformed_frames(server, payload):
    assert _error_code(_raw(server, payload)) == 5
    assert server.alive()


def test_wrong_fd_types_and_fd_flood(server):
    before = server.fds_to("/dev/null")
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        assert _error_code(_raw(server, _header(1, 0, 0), [null])) == 5
        # The kernel refuses more than 253 fds per message (SCM_MAX_FD): send 300 in two.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(server.sock))
            head = _header(3, 0, 0)
            for part, count in ((head[:7], 253), (head[7:], 47)):
                sock.sendmsg([part], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       array.array("i", [null] * count).tobytes())])
            assert _error_code(sock.recv(65536)) == 5
    finally:
        os.close(null)
    assert server.alive()
    assert server.fds_to("/dev/null") == before  # every received fd was closed (before replying)


def test_silent_peer_does_not_block_others(server):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect(str(server.sock))
        idle.sendall(_shim.MAGIC)  # then nothing: its thread waits, the others are served
        assert server.alive()


def test_non_root_peer_refused(workdir):
    eng = serve(workdir)
    try:
        # Widen the path as a misconfiguration would: SO_PEERCRED must still refuse.
        os.chmod(workdir, 0o711)
        os.chmod(eng.sock.parent, 0o711)
        os.chmod(eng.sock, 0o666)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: drop to nobody, then ask
            try:
                os.close(read_end)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                reply = _shim.forward({"ROUTE_TUNE_SOCKET": str(eng.sock),
                                       "ROUTE_TUNE_ENGINE": "resident",
                                       "CNI_COMMAND": "VERSION"}, b"")
                os.write(write_end, json.dumps([reply[0], reply[1].decode()]).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            code, out = json.loads(pipe.read())
        os.waitpid(pid, 0)
        assert code == 1 and json.loads(out)["code"] == 107
        assert eng.alive()
    finally:
        assert eng.stop() == 0
    assert "only root may use the engine" in eng.log()


# ------------------------------------------------------------------ concurrency


def _trace(path: Path) -> dict[str, list[tuple[int, int]]]:
    """netns key -> [(enter_ns, exit_ns)] from the server's test trace."""
    open_at: dict[str, list[int]] = {}
    spans: dict[str, list[tuple[int, int]]] = {}
    for line in path.read_text().splitlines():
        what, key, ts = line.split()[:3]
        if what == "enter":
            open_at.setdefault(key, []).append(int(ts))
        else:
            spans.setdefault(key, []).append((open_at[key].pop(0), int(ts)))
    return spans


def _parallel(requests: list[dict[str, str]]) -> list:
    replies: list = [None] * len(requests)

    def one(i: int) -> None:
        replies[i] = _shim.forward(requests[i], b"")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replies


def test_different_pods_parallel_same_pod_serialised(workdir, netns):
    trace = workdir / "trace"
    eng = serve(workdir, {"ROUTE_TUNE_SERVER_TEST_TRACE": str(trace),
                           "ROUTE_TUNE_SERVER_TEST_DELAY": "0.3"})
    try:
        pods = [netns() for _ in range(4)]
        shared = netns()
        requests = [eng.request_env(CNI_COMMAND="VERSION", CNI_NETNS=p) for p in pods]
        requests += [eng.request_env(CNI_COMMAND="VERSION", CNI_NETNS=shared)] * 4
        replies = _parallel(requests)
        assert all(r == (0, _protocol.version_reply(), b"") for r in replies)
    finally:
        assert eng.stop() == 0
    spans = _trace(trace)
    shared_key = str(os.stat(shared).st_ino)
    same = sorted(spans.pop(shared_key))
    assert len(same) == 4
    for (_, end), (start, _) in zip(same, same[1:]):
        assert start >= end  # never two at once in one netns
    others = [s for v in spans.values() for s in v]
    assert len(others) == 4
    # Different pods overlapped: some pair ran at the same time.
    assert any(a[0] < b[1] and b[0] < a[1] for a in others for b in others if a is not b)


def test_sigterm_finishes_in_flight_then_exits(workdir, netns):
    eng = serve(workdir, {"ROUTE_TUNE_SERVER_TEST_TRACE": str(workdir / "trace"),
                           "ROUTE_TUNE_SERVER_TEST_DELAY": "1"})
    env = eng.request_env(CNI_COMMAND="VERSION", CNI_NETNS=netns())
    result: list = []
    client = threading.Thread(target=lambda: result.append(_shim.forward(env, b"")))
    client.start()
    wait_until((workdir / "trace").exists, what="the request to be inside the server")
    eng.proc.send_signal(signal.SIGTERM)
    client.join()
    assert eng.proc.wait() == 0
    eng.stop()
    assert result == [(0, _protocol.version_reply(), b"")]
    assert not eng.sock.exists()
