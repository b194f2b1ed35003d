"""AF_PACKET sockets for ARP/NDP probing (``kernel.probe``): opened with their filter before
bind, closed off the caller's path, and the send-and-listen loop of one check.

The caller's *thread* must already be inside the pod netns.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field

from cniplugin.kernel import packets as pk
from cniplugin.protocol.errors import InterfaceNotFound, PluginError
from cniplugin.records.values import value

__all__ = ["Channel", "Channels", "IPAddress", "close_later", "exchange", "open_packet",
           "wait_sockets_closed"]

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_SO_ATTACH_FILTER = 26
_PACKET_OUTGOING = 4  # our own transmissions, looped back to packet sockets


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def _attach_filter(sock: socket.socket, program: pk.Program | None) -> None:
    if not program:
        return
    insns = (_SockFilter * len(program))(*(_SockFilter(*i) for i in program))
    fprog = _SockFprog(len(program), ctypes.cast(insns, ctypes.POINTER(_SockFilter)))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, bytes(fprog))
    except OSError as exc:  # only an optimisation: user space filters every frame anyway
        log.debug("SO_ATTACH_FILTER failed (%s); filtering in user space only", exc)


def open_packet(ifname: str, ethertype: int, program: pk.Program | None
          ) -> tuple[socket.socket, bytes]:
    """A non-blocking AF_PACKET socket on ``ifname`` for ``ethertype``, and the link's MAC.

    Created with protocol 0 (receives nothing) and given its filter *before* bind, so no
    unfiltered frame of another interface can be queued on it.
    """
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    except PermissionError as exc:
        raise PluginError(f"cannot open a raw socket for probing {ifname}: {exc} "
                          "(route-tune needs CAP_NET_RAW)") from exc
    try:
        _attach_filter(sock, program)
        sock.bind((ifname, ethertype))
        sock.setblocking(False)
        mac = sock.getsockname()[4]
    except OSError as exc:
        close_later(sock)
        if exc.errno == errno.ENODEV:
            raise InterfaceNotFound(f"interface {ifname} not found in the pod netns") from exc
        raise PluginError(f"cannot open a raw socket on {ifname}: {exc}") from exc
    if len(mac) != 6:
        close_later(sock)
        raise PluginError(f"{ifname} is not an Ethernet link (hardware address {mac.hex()})")
    return sock, mac


_closing: queue.Queue[socket.socket] = queue.Queue()
_closer_lock = threading.Lock()
_closer: list[threading.Thread] = []


def close_later(sock: socket.socket) -> None:
    """Close off the caller's path: releasing a packet socket waits for an RCU grace period
    (``synchronize_net``), which would otherwise delay the CNI reply. One resident
    daemon thread does it, because starting a thread per close costs more than the probe itself.
    """
    _closing.put(sock)
    with _closer_lock:
        if not _closer or not _closer[0].is_alive():
            _closer[:] = [threading.Thread(target=_close_forever, name="probe-close", daemon=True)]
            _closer[0].start()


def _close_forever() -> None:
    # Started by whichever request first closes a socket, i.e. from inside a pod netns.
    from cniplugin.kernel.netns import join_process_netns
    join_process_netns()
    while True:
        sock = _closing.get()
        try:
            sock.close()
        finally:
            _closing.task_done()


def wait_sockets_closed() -> None:
    """Block until every probe socket handed to the closer is closed (for shutdown and tests)."""
    _closing.join()


@dataclass(eq=False)
class Channel:
    """One raw socket (one family) of one check, and the probes it still has to send."""

    sock: socket.socket
    mac: bytes
    classify: Callable[[bytes], tuple[IPAddress, bytes] | None] | None = None
    pending: dict[IPAddress, bytes] = field(default_factory=dict)  # key -> probe frame
    tries: dict[IPAddress, int] = field(default_factory=dict)
    error: OSError | None = None

    def send_pending(self) -> None:
        for key, frame in self.pending.items():
            try:
                self.sock.send(frame)
                self.tries[key] = self.tries.get(key, 0) + 1
            except OSError as exc:  # e.g. link down: recorded, reported by the caller
                self.error = exc

    def frames(self) -> Iterator[bytes]:
        """Received frames (not our own transmissions) until the socket is drained."""
        while True:
            try:
                frame, addr = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.error = exc
                return
            if addr[2] != _PACKET_OUTGOING:
                yield frame


@value(frozen=False)
class Channels:
    """Opens at most one channel per family for a check and closes them all at the end."""

    ifname: str
    stack: ExitStack = field(default_factory=ExitStack)
    items: list[Channel] = field(default_factory=list)

    def open(self, ethertype: int, program: pk.Program | None) -> Channel:
        sock, mac = open_packet(self.ifname, ethertype, program)
        self.stack.callback(close_later, sock)
        self.items.append(Channel(sock, mac))
        return self.items[-1]

    def __enter__(self) -> Channels:
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()


def exchange(channels: list[Channel], on_match: Callable[[Channel, IPAddress, bytes], None], *,
             retries: int, interval: float, timeout: float) -> float:
    """Send every pending probe ``retries`` times, ``min(interval, timeout)`` apart, reading replies
    all along, until nothing is pending or ``timeout`` after the last probe. Returns seconds spent.

    ``on_match`` gets (channel, key, holder MAC) for each frame ``classify`` accepts; it may raise
    (a conflict) or drop the key from ``pending`` (a gateway answered).
    """
    spacing = min(interval, timeout)
    start = time.monotonic()
    sent, next_send, deadline = 0, start, float("inf")
    with selectors.DefaultSelector() as sel:
        for ch in channels:
            sel.register(ch.sock, selectors.EVENT_READ, ch)
        while any(ch.pending for ch in channels):
            now = time.monotonic()
            if sent < retries and now >= next_send:
                for ch in channels:
                    ch.send_pending()
                sent += 1
                next_send = start + sent * spacing  # a fixed grid: late sends do not stretch it
                if sent == retries:
                    deadline = time.monotonic() + timeout
                continue
            if now >= deadline:
                break
            wake = next_send if sent < retries else deadline
            for key, _ in sel.select(max(wake - now, 0)):
                ch = key.data
                for frame in ch.frames():
                    hit = ch.classify(frame)
                    if hit and hit[0] in ch.pending:
                        on_match(ch, *hit)
    return time.monotonic() - start
