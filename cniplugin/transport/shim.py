"""The tiny forwarding client of the ``route-tune`` executable.

It sends one CNI request (env, stdin, the pod's and the caller's netns fds) to the resident engine
(``cni-route-tune serve``) and returns the engine's reply: exit code, stdout and stderr bytes, exactly
what the in-process plugin would have printed. The wire format is documented in ``docs/resident.md``;
``transport.server`` imports the constants below so the two ends cannot drift apart.

Only C-level stdlib is imported (``_socket``; ``os`` and ``sys`` are loaded at interpreter start
anyway): this module is on the start path of every pod interface, and json/pyroute2/pydantic would
cost more than the whole forwarded request.
"""

from __future__ import annotations

import _socket
import os
import sys

#: 3 bytes "RTE" + 1 protocol-version byte. A request or reply with another magic is not served:
#: the server answers MISMATCH (and runs nothing), the shim falls back in-process.
MAGIC = b"RTE\x01"
#: The server's answer to a magic it does not speak: "nothing was run, do it yourself".
MISMATCH = b"RTE\x00"
#: Request header: magic(4) flags(1) env_len(4, BE) stdin_len(4, BE); reply header: magic(4)
#: exit_code(1) stdout_len(4, BE) stderr_len(4, BE).
HEADER_LEN = 13
#: Request flag bits, in the order the fds travel in SCM_RIGHTS.
FLAG_POD_NETNS = 1
FLAG_NODE_NETNS = 2
#: Env variables forwarded to the engine (the CNI ones and route-tune's own node settings).
ENV_PREFIXES = ("CNI_", "ROUTE_TUNE_")

#: records/defaults.py's SOCKET_PATH, spelled out: importing cniplugin.records.defaults here would
#: add two module loads to every CNI call, a visible share of the shim's start.
#: tests/unit/test_single_source.py keeps the two equal.
DEFAULT_SOCKET = "/run/route-tune/engine.sock"
MODES = ("auto", "resident", "inprocess")

#: The biggest reply the shim accepts (a result JSON is a few KiB; this only stops a runaway).
_MAX_REPLY = 64 << 20


class _NoAnswer(Exception):
    """No server took the request: nothing was run, falling back is safe."""


class _Dropped(Exception):
    """The server took the request but no complete reply came back: it may have run."""


def mode(environ) -> str:
    """The engine policy from ``ROUTE_TUNE_ENGINE``: auto (default), resident or inprocess."""
    value = environ.get("ROUTE_TUNE_ENGINE", "auto").strip().lower() or "auto"
    return value if value in MODES else "auto"


def socket_path(environ) -> str:
    """The engine's socket: ``ROUTE_TUNE_SOCKET`` or :data:`DEFAULT_SOCKET`."""
    return environ.get("ROUTE_TUNE_SOCKET") or DEFAULT_SOCKET


def encode_env(environ) -> bytes:
    """``K=V\\0`` for every forwarded variable (surrogateescape keeps undecodable bytes intact)."""
    out = []
    for key, value in environ.items():
        if key.startswith(ENV_PREFIXES):
            out.append(f"{key}={value}\0".encode("utf-8", "surrogateescape"))
    return b"".join(out)


def forward(environ, stdin: bytes) -> tuple[int, bytes, bytes] | None:
    """Serve one request through the resident engine.

    Returns ``(exit_code, stdout, stderr)``, or None when the caller should run the request
    in-process: mode ``inprocess``, or mode ``auto`` and no server took the request (socket missing,
    connection refused, protocol mismatch). In mode ``resident`` a missing server is a CNI error
    (code 11, try again later). A server that took the request and then dropped the connection is
    code 11 in every mode: the request may have been half applied, so it is not re-run here.
    """
    policy = mode(environ)
    if policy == "inprocess":
        return None
    try:
        return _exchange(socket_path(environ), environ, stdin)
    except _NoAnswer as exc:
        if policy == "auto":
            return None
        return 1, try_again_reply(stdin, "resident engine not available", str(exc)), b""
    except _Dropped as exc:
        return 1, try_again_reply(stdin, "resident engine dropped the request", str(exc)), b""
    except OSError as exc:  # before anything was sent (e.g. no /proc): nothing ran
        if policy == "auto":
            return None
        return 1, try_again_reply(stdin, "resident engine not reachable", str(exc)), b""


def _is_net_ns(fd: int) -> bool:
    """A network namespace, not another nsfs file (``/proc/self/ns/mnt``): those stay paths, so
    the engine reports them exactly as in-process (ADD code 3, DEL success)."""
    import fcntl  # a C extension module: no Python-level imports
    try:
        return fcntl.ioctl(fd, 0xB703) == 0x40000000  # NS_GET_NSTYPE == CLONE_NEWNET
    except OSError:
        return False


def _exchange(path: str, environ, stdin: bytes) -> tuple[int, bytes, bytes]:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    fds: list[int] = []
    try:
        try:
            sock.connect(path)
        except OSError as exc:
            raise _NoAnswer(f"{path}: {exc.strerror or exc}") from None
        flags = 0
        node_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        netns = environ.get("CNI_NETNS", "")
        if netns:
            try:
                fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                fd = -1  # missing: the engine reports it (DEL succeeds, ADD fails with code 3)
            if fd >= 0:
                fds.append(fd)
                # Only an nsfs file travels (all namespaces share nsfs's st_dev; the server
                # checks the type); for anything else the engine opens the path itself and
                # reports it exactly as in-process.
                if os.fstat(fd).st_dev == os.fstat(node_fd).st_dev and _is_net_ns(fd):
                    flags |= FLAG_POD_NETNS
                else:
                    os.close(fds.pop())
        fds.append(node_fd)
        flags |= FLAG_NODE_NETNS
        env = encode_env(environ)
        header = (MAGIC + bytes((flags,)) + len(env).to_bytes(4, "big")
                  + len(stdin).to_bytes(4, "big"))
        fdbytes = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)
        try:
            sent = sock.sendmsg([header], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fdbytes)])
            sock.sendall(header[sent:] + env + stdin)
        except OSError:
            pass  # the server may have refused early (bad peer, too big): its reply explains
        for fd in fds:
            os.close(fd)
        fds.clear()
        return _read_reply(sock)
    finally:
        for fd in fds:
            os.close(fd)
        sock.close()


def _read_reply(sock) -> tuple[int, bytes, bytes]:
    head = _recv_exact(sock, HEADER_LEN)
    if head[:4] != MAGIC:
        if len(head) >= 4 and head[:3] == MAGIC[:3]:
            raise _NoAnswer(f"protocol mismatch (server speaks {head[3]}, shim {MAGIC[3]})")
        if not head:
            raise _Dropped("connection closed before any reply")
        raise _Dropped("reply is not from a route-tune engine")
    if len(head) < HEADER_LEN:
        raise _Dropped("truncated reply header")
    out_len = int.from_bytes(head[5:9], "big")
    err_len = int.from_bytes(head[9:13], "big")
    if out_len + err_len > _MAX_REPLY:
        raise _Dropped("reply too large")
    body = _recv_exact(sock, out_len + err_len)
    if len(body) < out_len + err_len:
        raise _Dropped("truncated reply")
    return head[4], body[:out_len], body[out_len:]


def _recv_exact(sock, n: int) -> bytes:
    """Up to ``n`` bytes: fewer only if the server closed the connection (or it broke)."""
    chunks = []
    while n:
        try:
            chunk = sock.recv(min(n, 1 << 20))
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def try_again_reply(stdin: bytes, msg: str, details: str) -> bytes:
    """A CNI code-11 error reply in the config's cniVersion (``protocol.errors.error_reply``:
    stdlib-only and import-free, and loaded only on this failure path)."""
    from cniplugin.protocol.errors import TryAgainLater, error_reply
    return error_reply(config_version(stdin) or "1.1.0", TryAgainLater.code, msg, details)


def config_version(stdin: bytes) -> str | None:
    """The top-level ``cniVersion`` of the config if it is a version route-tune supports.

    A tiny scanner, not a parser: it tracks strings and nesting depth so that a prevResult's
    cniVersion is never mistaken for the config's.
    """
    from cniplugin._version import SUPPORTED_VERSIONS  # import-free module

    depth, i, n = 0, 0, len(stdin)
    key_next = False
    while i < n:
        c = stdin[i]
        if c == 0x22:  # '"'
            j = i + 1
            while j < n and stdin[j] != 0x22:
                j += 2 if stdin[j] == 0x5C else 1
            token = stdin[i + 1:j]
            if depth == 1 and key_next and token == b"cniVersion":
                k = j + 1
                while k < n and stdin[k] in b" \t\r\n:":
                    k += 1
                if k < n and stdin[k] == 0x22:
                    end = stdin.find(b'"', k + 1)
                    value = stdin[k + 1:end].decode("ascii", "replace") if end > 0 else ""
                    return value if value in SUPPORTED_VERSIONS else None
            key_next = False
            i = j + 1
            continue
        if c in b"{[":
            depth += 1
            key_next = c == 0x7B
        elif c in b"}]":
            depth -= 1
        elif c == 0x2C:  # ','
            key_next = True
        elif c == 0x3A:  # ':'
            key_next = False
        i += 1
    return None
