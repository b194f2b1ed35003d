"""Getting the engine's listening socket, and giving it to a successor (``docs/resident.md``).

A new engine (an upgrade's surge pod, a restart) asks the engine that answers on the public path
for its listening socket and receives it over that very connection (``SCM_RIGHTS``), as HAProxy's
seamless reload does. It is the same kernel socket, bound to the same path: connections queued in
its backlog while the engines change are accepted by the new one, none is refused, dropped or
accepted twice, and clients never see the path missing. Only the passing engine's side of one
connection carries anything, so it works between containers with separate pid namespaces that
share the socket's directory.

Exchange (after the engine's usual root-only peer check):
``REQUEST`` from the new engine; the old one stops accepting and sends ``GRANT`` with the
listener fd; the new one answers ``ACK`` and owns it; the old one then never accepts again. If
the ``ACK`` does not come (the new engine died), the old one resumes accepting. Takeovers are
serialised by a flock on the socket's directory held only while one is in progress.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import threading
import time

log = logging.getLogger("cniplugin.server")

__all__ = ["REQUEST", "GRANT", "ACK", "BACKLOG", "Gate", "take_listener", "give_listener",
           "engine_answers"]

#: 3 bytes "RTH" + 1 version byte; an engine that does not know it answers the shim's mismatch.
REQUEST = b"RTH\x01"
GRANT = b"RTH\x02"
ACK = b"RTH\x06"
BACKLOG = 128
#: How long an engine waits for the successor's ACK before it resumes accepting.
ACK_TIMEOUT = 10.0
#: How long a new engine waits for an answer to its request (the old one may be busy: every
#: request slot taken, the handover connection queued behind them).
GRANT_TIMEOUT = 60.0
#: A running engine that is stopping (or dying) answers nothing: try the path again.
_ATTEMPTS = 50


def engine_answers(path: str) -> bool:
    """Whether something accepts connections on ``path`` now (no request is sent)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def take_listener(path: str) -> tuple[socket.socket, str]:
    """The listening socket for ``path`` and how it was obtained (for the log).

    Under the takeover lock: no socket file -> a new listener; a socket nobody answers on (an
    engine was killed) -> removed and replaced; a live engine -> its listener, handed over.
    """
    parent = _private_dir(path)
    dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _lock(dir_fd, parent)
        for _ in range(_ATTEMPTS):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return _bind(path), "new socket"
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                try:
                    conn.connect(path)
                except ConnectionRefusedError:
                    log.info("removing stale socket %s", path)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    return _bind(path), "stale socket replaced"
                listener = _request(conn, path)
            finally:
                conn.close()
            if listener is not None:
                return listener, "taken over from the running engine"
            time.sleep(0.1)  # it was stopping: its socket goes away, or it answers again
        raise OSError(errno.EADDRINUSE, f"the engine on {path} neither hands over nor stops")
    finally:
        os.close(dir_fd)  # releases the takeover lock


class Gate:
    """The running engine's side: its accept loop and the thread serving a successor's request.

    States: serving -> pausing (asked) -> paused (the loop stands still) -> serving again, or
    handed-over; closed once the loop has ended. The loop polls ``fileno()`` beside its listener.
    """

    def __init__(self) -> None:
        self.state = "serving"
        self._changed = threading.Condition()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def fileno(self) -> int:
        return self._wake_r

    def pause(self) -> bool:
        """The loop, woken through ``fileno()``: wait out the handover; True if it succeeded."""
        os.read(self._wake_r, 64)
        with self._changed:
            self.state = "paused"
            self._changed.notify_all()
            self._changed.wait_for(lambda: self.state != "paused")
            return self.state == "handed-over"

    def hand_over(self, conn: socket.socket, listener: socket.socket, pid: int) -> None:
        """A successor (pid ``pid``, as this engine's pid namespace sees it; 0 if it cannot)
        asked on ``conn``: stop the loop, pass ``listener``, then let the loop end or resume."""
        with self._changed:
            if self.state != "serving":
                log.warning("handover request from pid %d refused: engine is %s", pid, self.state)
                return
            self.state = "pausing"
            os.write(self._wake_w, b"h")
            self._changed.wait_for(lambda: self.state != "pausing")
            if self.state != "paused":
                return  # stopping meanwhile: the successor finds the socket gone and binds anew
        done = give_listener(conn, listener)
        with self._changed:
            self.state = "handed-over" if done else "serving"
            self._changed.notify_all()
        if done:
            log.info("socket handed over to the engine with pid %d; finishing in-flight "
                     "requests", pid)

    def close(self) -> bool:
        """The loop has ended; True if it ended by a handover."""
        with self._changed:
            handed_over, self.state = self.state == "handed-over", "closed"
            self._changed.notify_all()
        return handed_over

    def release(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)


def give_listener(conn: socket.socket, listener: socket.socket) -> bool:
    """Send ``listener`` to the successor on ``conn``; True once it has confirmed it owns it.

    The caller has stopped accepting; on False it must resume (the successor is gone).
    """
    try:
        socket.send_fds(conn, [GRANT], [listener.fileno()])
        conn.settimeout(ACK_TIMEOUT)
        answer = _recv_exact(conn, len(ACK))
    except OSError as exc:
        log.warning("handover failed, serving on: %s", exc)
        return False
    if answer != ACK:
        log.warning("handover not confirmed (%r), serving on", answer)
        return False
    return True


def _request(conn: socket.socket, path: str) -> socket.socket | None:
    """Ask the engine on ``conn`` for its listener; None if it stopped without answering."""
    conn.settimeout(GRANT_TIMEOUT)
    try:
        conn.sendall(REQUEST)
        data, fds, _, _ = socket.recv_fds(conn, len(GRANT), 1, socket.MSG_CMSG_CLOEXEC)
    except (ConnectionResetError, BrokenPipeError):
        return None  # it was stopping
    except TimeoutError:
        raise OSError(errno.ETIMEDOUT, f"the engine on {path} did not answer the handover "
                                       f"within {GRANT_TIMEOUT:.0f} s") from None
    received = [socket.socket(fileno=fd) for fd in fds]
    if data != GRANT or len(received) != 1:
        for sock in received:
            sock.close()
        if not data:
            return None  # it was stopping
        raise OSError(errno.EPROTO, f"the engine on {path} cannot hand over its socket (it "
                                    f"answered {data!r}); stop it first")
    listener = received[0]
    if (listener.family, listener.type) != (socket.AF_UNIX, socket.SOCK_STREAM) or \
            not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        listener.close()
        raise OSError(errno.EPROTO, f"the engine on {path} sent something that is not a "
                                    f"listening unix socket")
    try:
        conn.sendall(ACK)
    except OSError:
        listener.close()  # it gave up waiting and serves on: the socket is still its own
        return None
    return listener


def _private_dir(path: str) -> str:
    """The socket's directory: created 0700, or an existing one owned by us, not group/world-writable."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.mkdir(parent, 0o700)
    except FileExistsError:
        st = os.stat(parent)
        if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise OSError(errno.EPERM, f"{parent}: must be owned by us and not group/"
                                       f"world-writable") from None
    return parent


def _lock(dir_fd: int, parent: str) -> None:
    """The takeover lock: a flock on the directory itself (no lock file left behind)."""
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        log.info("waiting for the takeover lock on %s (another engine is taking over; an engine "
                 "without handover holds it until it exits)", parent)
    fcntl.flock(dir_fd, fcntl.LOCK_EX)


def _bind(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o077)  # the socket is never, even briefly, reachable by others
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(BACKLOG)
    return sock


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf
