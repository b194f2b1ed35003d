"""The native forwarder (``transport/forwarder.c``) against the Python client (``transport/shim.py``).

Both clients talk to the same recording engine: a real unix socket whose requests are decoded by
the server's own ``read_request``. For every scenario the two must deliver the same request (env
block, stdin, which netns fds travel) and print the same bytes with the same exit code, and a
request the engine may have run is never run a second time.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from pathlib import Path

import pytest

from harness.host import REPO, ROUTE_TUNE, require_root, run_plugin
from cniplugin.transport import native, server as _server, shim as _shim

PYTHON_CLIENT = REPO / "bin" / "route-tune"  # the Python plugin from the checkout


@pytest.fixture(scope="module", autouse=True)
def _setup():
    require_root()
    assert native.is_native(ROUTE_TUNE), "bin/dev setup builds the venv's route-tune natively"


class Engine:
    """Serves every connection with ``reply(request) -> bytes`` and records what arrived."""

    def __init__(self, path: Path, reply):
        self.path, self.reply, self.requests, self.connections = path, reply, [], 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.connections += 1
                fds: list[int] = []
                try:
                    env, stdin, pod_fd, node_fd = _server.read_request(conn, fds)
                    kinds = tuple(None if fd is None else os.readlink(f"/proc/self/fd/{fd}")
                                  for fd in (pod_fd, node_fd))
                    self.requests.append((env, stdin, kinds))
                except _server._Mismatch:
                    self.requests.append("mismatch")
                finally:
                    for fd in fds:
                        os.close(fd)
                frame = self.reply(self.requests[-1])
                if frame:
                    conn.sendall(frame)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def engine(tmp_path):
    started: list[Engine] = []

    def start(reply) -> Engine:
        started.append(Engine(tmp_path / f"engine{len(started)}.sock", reply))
        return started[-1]

    yield start
    for e in started:
        e.close()


def frame(code: int, out: bytes, err: bytes = b"") -> bytes:
    return (_shim.MAGIC + bytes((code,)) + len(out).to_bytes(4, "big")
            + len(err).to_bytes(4, "big") + out + err)


def both(env: dict, stdin: bytes, args: tuple[str, ...] = ()):
    """Run the native and the Python client; return their (exit, stdout, stderr), with the
    process id in stderr's log lines blanked (the only thing allowed to differ)."""
    return [(p.returncode, p.stdout, re.sub(rb"^route-tune\[\d+\]", b"route-tune[pid]", p.stderr,
                                            flags=re.M))
            for p in (run_plugin(env, stdin, executable=exe, args=args)
                      for exe in (ROUTE_TUNE, PYTHON_CLIENT))]


def cni_env(tmp_path, sock: Path, mode: str, netns: str = "/proc/self/ns/net", **extra) -> dict:
    defaults = tmp_path / "defaults.json"
    defaults.write_text(json.dumps({"logDir": str(tmp_path / "log"),
                                    "stateDir": str(tmp_path / "state")}))
    return {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "rtF-c1", "CNI_IFNAME": "net1",
            "CNI_NETNS": netns, "CNI_PATH": "/usr/lib/cni", "ROUTE_TUNE_SOCKET": str(sock),
            "ROUTE_TUNE_ENGINE": mode, "ROUTE_TUNE_DEFAULTS": str(defaults),
            "NOT_FORWARDED": "x", **extra}


#: A config big enough to need several sends, with non-ASCII bytes (768 KiB as JSON).
BIG = json.dumps({"cniVersion": "1.0.0", "name": "rtF-net", "type": "route-tune",
                  "blob": "é" * (128 << 10)}).encode()


def test_both_clients_deliver_the_same_request_and_print_the_same_reply(tmp_path, engine):
    e = engine(lambda _: frame(3, b'{"result": 1}', b"engine log line\n"))
    env = cni_env(tmp_path, e.path, "resident")
    native_run, python_run = both(env, BIG)
    assert native_run == python_run == (3, b'{"result": 1}', b"engine log line\n")
    assert len(e.requests) == 2 and e.requests[0] == e.requests[1]
    sent_env, stdin, (pod, node) = e.requests[0]
    assert stdin == BIG
    assert sent_env == {k: v for k, v in env.items() if k.startswith(("CNI_", "ROUTE_TUNE_"))}
    assert pod.startswith("net:[") and node.startswith("net:[")


@pytest.mark.parametrize("netns", ["/proc/self/ns/mnt", "/nonexistent/netns", ""])
def test_only_a_network_namespace_travels_as_an_fd(tmp_path, engine, netns):
    e = engine(lambda _: frame(0, b""))
    both(cni_env(tmp_path, e.path, "resident", netns=netns), b"{}")
    assert [r[2] for r in e.requests] == [(None, r[2][1]) for r in e.requests]
    assert e.requests[0] == e.requests[1]


def test_no_engine_auto_runs_in_process_resident_says_try_again(tmp_path):
    gone = tmp_path / "none.sock"
    auto_native, auto_python = both(cni_env(tmp_path, gone, "auto"), b"not json")
    assert auto_native == auto_python and auto_native[0] == 1
    assert json.loads(auto_native[1])["code"] == 6      # the in-process plugin decoded stdin
    res_native, res_python = both(cni_env(tmp_path, gone, "resident"), b"not json")
    assert res_native == res_python and json.loads(res_native[1])["code"] == 11


def test_inprocess_mode_never_connects(tmp_path, engine):
    e = engine(lambda _: frame(0, b"from the engine"))
    native_run, python_run = both(cni_env(tmp_path, e.path, " InProcess "), b"not json")
    assert native_run == python_run and json.loads(native_run[1])["code"] == 6
    assert e.connections == 0


@pytest.mark.parametrize("mode", ["auto", "resident"])
def test_protocol_mismatch_replays_stdin_or_says_try_again(tmp_path, engine, mode):
    e = engine(lambda _: _shim.MISMATCH + bytes(_shim.HEADER_LEN - 4))
    native_run, python_run = both(cni_env(tmp_path, e.path, mode), BIG[:-1] + b" junk")
    assert native_run == python_run
    reply = json.loads(native_run[1])
    if mode == "auto":
        assert reply["code"] == 6     # the whole stdin reached the in-process plugin
    else:
        assert reply["code"] == 11 and "protocol mismatch" in reply["details"]


@pytest.mark.parametrize("reply, details", [
    (b"", "connection closed before any reply"),
    (b"HTTP/1.1 400 Bad\r\n", "reply is not from a route-tune engine"),
    (_shim.MAGIC + b"\x00\x00", "truncated reply header"),
    (frame(0, b"x" * 100)[:-10], "truncated reply"),
])
def test_a_dropped_request_is_never_run_twice(tmp_path, engine, reply, details):
    e = engine(lambda _: reply)
    native_run, python_run = both(cni_env(tmp_path, e.path, "auto"), b'{"cniVersion": "0.4.0"}')
    assert native_run == python_run
    assert json.loads(native_run[1]) == {"cniVersion": "0.4.0", "code": 11,
                                         "msg": "resident engine dropped the request",
                                         "details": details}
    assert e.connections == 2   # one per client: neither re-sent it nor ran it in-process


def test_cheap_commands_print_what_the_python_plugin_prints(tmp_path):
    for env, args in (({"CNI_COMMAND": "VERSION"}, ()), ({}, ()), ({}, ("--version",)),
                      ({"CNI_COMMAND": "BOGUS"}, ())):
        native_run, python_run = both(env, b"", args)
        assert native_run == python_run


def test_a_missing_interpreter_is_one_cni_error(tmp_path):
    exe = native.build(tmp_path / "route-tune", python=str(tmp_path / "gone" / "python3"))
    proc = run_plugin({"CNI_COMMAND": "VERSION"}, b"", executable=exe)
    reply = json.loads(proc.stdout)
    assert proc.returncode == 1 and reply["code"] == 999 and "cni-route-tune install" in reply["details"]


def test_the_forwarder_speaks_the_shims_wire_constants():
    source = native.SOURCE.read_text()
    assert f'#define MAGIC "RTE\\x{_shim.MAGIC[3]:02x}"' in source
    assert f"#define HEADER_LEN {_shim.HEADER_LEN}" in source
    assert f"#define FLAG_POD_NETNS {_shim.FLAG_POD_NETNS}" in source
    assert f"#define FLAG_NODE_NETNS {_shim.FLAG_NODE_NETNS}" in source
    assert f'#define DEFAULT_SOCKET "{_shim.DEFAULT_SOCKET}"' in source
    assert all(f'"{p}"' in source for p in _shim.ENV_PREFIXES)
