"""The resident engine's side of the wire (``docs/resident.md``): read one request with the fds
it carries, frame one reply.

The forwarding client (``transport.shim``) owns the constants both ends share; the server
(``transport.server``) owns who may connect and how requests are run. What lies between, the
bytes and the SCM_RIGHTS fds of one exchange, is here.
"""

from __future__ import annotations

import array
import os
import socket
import struct

from cniplugin._version import SUPPORTED_VERSIONS
from cniplugin.kernel import netns as _netns
from cniplugin.protocol.errors import CNIError
from cniplugin.transport import shim as _shim

__all__ = ["MAX_ENV", "MAX_STDIN", "MAX_FDS", "BadRequest", "Mismatch", "frame", "error_frame",
           "recv_exact", "close_all", "decode_env", "read_request", "peer_cred"]

#: Request limits: a CNI env is a few hundred bytes, a config with an 8-rail prevResult a few KiB.
MAX_ENV = 1 << 20
MAX_STDIN = 4 << 20
#: At most the pod netns fd and the caller's netns fd.
MAX_FDS = 2
_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)


class BadRequest(Exception):
    """A request that cannot be served; the message goes into the error reply."""


class Mismatch(Exception):
    """The peer speaks another protocol version (or no protocol at all)."""


def frame(exit_code: int, stdout: bytes, stderr: bytes) -> bytes:
    return (_shim.MAGIC + bytes((exit_code,)) + len(stdout).to_bytes(4, "big")
            + len(stderr).to_bytes(4, "big") + stdout + stderr)


def error_frame(err: CNIError, stdin: bytes = b"") -> bytes:
    """An error reply shaped exactly like the plugin's own: the error JSON in the config's
    version, exit 1."""
    return frame(1, err.reply(_shim.config_version(stdin) or SUPPORTED_VERSIONS[-1]), b"")


def _collect_fds(ancdata, fds: list[int]) -> None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)


def recv_exact(conn: socket.socket, n: int, fds: list[int]) -> bytes:
    """Exactly ``n`` bytes; every fd that arrives on the way lands in ``fds`` (caller closes)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        nbytes, ancdata, flags, _ = conn.recvmsg_into(
            [view[got:]], _ANC_SPACE, socket.MSG_CMSG_CLOEXEC)
        _collect_fds(ancdata, fds)
        if flags & socket.MSG_CTRUNC:
            raise BadRequest(f"too many file descriptors (at most {MAX_FDS})")
        if nbytes == 0:
            raise BadRequest(f"truncated request ({got} of {n} bytes)")
        got += nbytes
    return bytes(buf)


def close_all(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())


def decode_env(block: bytes) -> dict[str, str]:
    """``K=V\\0...`` -> dict, keeping only the forwarded prefixes."""
    if block and not block.endswith(b"\0"):
        raise BadRequest("env block not NUL-terminated")
    env: dict[str, str] = {}
    for item in block.split(b"\0")[:-1]:
        key, sep, value = item.partition(b"=")
        if not sep or not key:
            raise BadRequest("env entry without '='")
        k = key.decode("utf-8", "surrogateescape")
        if k.startswith(_shim.ENV_PREFIXES):
            env[k] = value.decode("utf-8", "surrogateescape")
    return env


def read_request(conn: socket.socket, fds: list[int]):
    """Read one request: ``(env, stdin, pod_fd | None, node_fd | None)``.

    Raises Mismatch for a foreign magic, BadRequest for anything else that is wrong.
    """
    head = recv_exact(conn, 4, fds)
    if head != _shim.MAGIC:
        raise Mismatch(head)
    head += recv_exact(conn, _shim.HEADER_LEN - 4, fds)
    flags = head[4]
    env_len = int.from_bytes(head[5:9], "big")
    stdin_len = int.from_bytes(head[9:13], "big")
    if flags & ~(_shim.FLAG_POD_NETNS | _shim.FLAG_NODE_NETNS):
        raise BadRequest(f"unknown request flags {flags:#x}")
    if env_len > MAX_ENV or stdin_len > MAX_STDIN:
        raise BadRequest(f"request too large (env {env_len} bytes, stdin {stdin_len} bytes; "
                         f"limits {MAX_ENV} and {MAX_STDIN})")
    body = recv_exact(conn, env_len + stdin_len, fds)
    want = bin(flags).count("1")
    if len(fds) != want:
        raise BadRequest(f"expected {want} file descriptors, got {len(fds)}")
    for fd in fds:
        if not _netns.is_netns(fd):
            raise BadRequest("a passed file descriptor is not a network namespace")
    it = iter(fds)
    pod_fd = next(it) if flags & _shim.FLAG_POD_NETNS else None
    node_fd = next(it) if flags & _shim.FLAG_NODE_NETNS else None
    return decode_env(body[:env_len]), body[env_len:], pod_fd, node_fd


def peer_cred(conn: socket.socket) -> tuple[int, int, int]:
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid, gid
