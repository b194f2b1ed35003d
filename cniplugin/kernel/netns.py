"""Network-namespace handles: open safely, enter per thread, lock.

Nothing here ever creates a namespace or a file. A namespace is held as an O_RDONLY fd on its
nsfs inode; ``entered(fd)`` moves only the *calling thread* into it and back, so the resident
server can serve pods concurrently from several threads. Locks are flocks on those same fds:
``/var/run/netns/x`` and ``/proc/<pid>/ns/net`` share the inode and so share the lock, and no
lock file is left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)
_THREAD_NETNS = "/proc/thread-self/ns/net"


def open_netns(path: str) -> int:
    """Open the netns at ``path`` read-only; a missing path raises FileNotFoundError.

    Refuses anything that is not an nsfs network namespace (a regular file left by another
    plugin must not be mistaken for a namespace).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if not is_netns(fd):
            raise NotADirectoryError(f"{path} is not a network namespace")
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def opened_if_same(path: str, netns_inode: int) -> Iterator[int | None]:
    """The netns at ``path`` if it is still the one recorded (nsfs inode ``netns_inode``),
    closed after the body; None when ``path`` is empty, gone, not a netns, or now names
    another namespace (another sandbox)."""
    try:
        fd = open_netns(path) if path else None
    except OSError:
        fd = None
    if fd is not None and inode(fd) != netns_inode:
        os.close(fd)
        fd = None
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def is_netns(fd: int) -> bool:
    """True when ``fd`` is a network namespace (not a file, nor another namespace type)."""
    # NS_GET_NSTYPE answers only on nsfs files, with the namespace's CLONE_* type.
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False


def current_netns() -> int:
    """A new fd on the calling thread's current netns (the caller closes it)."""
    return os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)


def inode(fd: int) -> int:
    """The nsfs inode of a namespace fd: its identity (same pod netns => same inode)."""
    return os.fstat(fd).st_ino


_libc_setns: list = []  # Python 3.11: libc's setns through ctypes, loaded once


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python >= 3.12
        os.setns(fd, CLONE_NEWNET)
        return
    import ctypes

    if not _libc_setns:  # dlopen + a ctypes class per call is slow: do it once
        _libc_setns.append(ctypes.CDLL(None, use_errno=True).setns)
    if _libc_setns[0](fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def entered(fd: int | None) -> Iterator[None]:
    """Run the body with the calling thread inside the netns ``fd`` (None: stay where we are)."""
    if fd is None:
        yield
        return
    home = current_netns()
    try:
        if inode(home) == inode(fd):
            yield
            return
        _setns(fd)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


@contextlib.contextmanager
def locked(fd: int) -> Iterator[None]:
    """Exclusive flock on ``fd`` for the body (blocks until granted)."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


@contextlib.contextmanager
def node_lock(node_fd: int | None) -> Iterator[None]:
    """Lock the node namespace: flock on a fresh fd of it (the caller's own netns when None).

    A fresh fd per call: flock locks belong to the open file description, so two threads of the
    resident server sharing one fd would not exclude each other.
    """
    if node_fd is None:
        fd = current_netns()
    else:
        with entered(node_fd):
            fd = current_netns()
    try:
        with locked(fd):
            yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def pod_lock(pod_fd: int) -> Iterator[None]:
    """Lock one pod netns (fresh open file description, for the same reason as node_lock)."""
    fd = os.open(f"/proc/self/fd/{pod_fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with locked(fd):
            yield
    finally:
        os.close(fd)


def join_process_netns() -> None:
    """Move the calling thread into the process's own netns (the main thread's).

    Long-lived helper threads must call this first when they may be started from a request
    thread that is inside a pod netns: a thread parked there would keep the pod's netns (and
    its veth) alive after the runtime deleted it.
    """
    fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
    finally:
        os.close(fd)
