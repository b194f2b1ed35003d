"""ICMP echo from inside a netns, with the interface each reply arrived on.

The caller's *thread* must already be inside the netns (``kernel.netns.entered``). Every echo
is sent on its own raw socket, bound to its source address when it has one, so the kernel
routes it exactly as an application bound to that address (source rules apply); unbound, the
kernel picks the source. The reply's ingress interface comes from ``IP_PKTINFO`` /
``IPV6_PKTINFO``, so a caller can tell a reply that came back on the request's interface from
one that came back on another (asymmetric routing). All echoes are in flight at once: the
whole batch takes at most ``attempts`` x ``timeout``.
"""

from __future__ import annotations

import ipaddress
import random
import select
import socket
import struct
import time
from collections.abc import Sequence

from cniplugin.kernel.packets import inet_checksum
from cniplugin.records.values import value

__all__ = ["EchoResult", "echo_all"]

_ECHO_REQUEST, _ECHO_REPLY = {4: 8, 6: 128}, {4: 0, 6: 129}
_IP_PKTINFO = 8   # Linux <linux/in.h>; the socket module does not export it
_PAYLOAD = b"route-tune-reach"


@value
class EchoResult:
    """One echo's outcome: answered, the reply's ingress ifindex, its round trip, or why not."""

    answered: bool
    reply_ifindex: int = 0
    rtt_ms: float | None = None
    error: str = ""


def _request(family: int, ident: int, seq: int) -> bytes:
    header = struct.pack("!BBHHH", _ECHO_REQUEST[family], 0, 0, ident, seq)
    # IPv6: the kernel computes the ICMPv6 checksum (it needs the pseudo header).
    csum = inet_checksum(header + _PAYLOAD) if family == 4 else 0
    return struct.pack("!BBHHH", _ECHO_REQUEST[family], 0, csum, ident, seq) + _PAYLOAD


def _open(family: int, src: str) -> socket.socket:
    if family == 4:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
    else:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    try:
        if src:
            sock.bind((src, 0))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _ingress(ancillary: list[tuple[int, int, bytes]]) -> int:
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == _IP_PKTINFO:
            return struct.unpack_from("i", data)[0]          # struct in_pktinfo: ifindex first
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
            return struct.unpack_from("I", data, 16)[0]      # struct in6_pktinfo: addr, ifindex
    return 0


def _parse_reply(family: int, data: bytes) -> tuple[int, int] | None:
    """(ident, seq) of an echo reply (IPv4 raw sockets see the IP header, IPv6 ones do not)."""
    icmp = data[(data[0] & 0x0F) * 4:] if family == 4 else data
    if len(icmp) < 8 or icmp[0] != _ECHO_REPLY[family]:
        return None
    _, _, _, ident, seq = struct.unpack("!BBHHH", icmp[:8])
    return ident, seq


def echo_all(probes: Sequence[tuple[str, str]], *, attempts: int = 3,
             timeout: float = 1.0) -> list[EchoResult]:
    """One answered echo per ``(src, dst)`` pair (``src`` "" = the kernel's choice), up to
    ``attempts`` requests each, ``timeout`` seconds apart; results in the pairs' order."""
    if attempts < 1 or timeout <= 0:
        raise ValueError(f"attempts must be >= 1 and timeout > 0, not {attempts}, {timeout}")
    ident = random.getrandbits(16)
    results: list[EchoResult | None] = [None] * len(probes)
    socks: dict[int, socket.socket] = {}
    sent: dict[int, tuple[int, float]] = {}      # seq -> (probe index, send time)
    seq = 0
    try:
        for i, (src, dst) in enumerate(probes):
            try:
                socks[i] = _open(ipaddress.ip_address(dst).version, src)
            except OSError as err:
                results[i] = EchoResult(False, error=f"cannot send from {src or 'any'}: "
                                                     f"{err.strerror or err}")
        for _ in range(attempts):
            pending = [i for i in socks if results[i] is None]
            if not pending:
                break
            for i in pending:
                seq = (seq + 1) & 0xFFFF
                family = ipaddress.ip_address(probes[i][1]).version
                sent[seq] = (i, time.monotonic())
                try:
                    socks[i].sendto(_request(family, ident, seq), (probes[i][1], 0))
                except OSError as err:
                    results[i] = EchoResult(False, error=f"send failed: {err.strerror or err}")
            _collect(probes, socks, sent, results, ident, time.monotonic() + timeout)
    finally:
        for sock in socks.values():
            sock.close()
    return [r if r is not None else EchoResult(False, error=f"no reply from {dst} within "
                                                             f"{attempts} x {timeout:g} s")
            for r, (_, dst) in zip(results, probes)]


def _collect(probes, socks, sent, results, ident: int, deadline: float) -> None:
    """Read replies until every probe is answered or ``deadline`` passes."""
    by_fd = {sock.fileno(): i for i, sock in socks.items()}
    while any(results[i] is None for i in socks) and (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([socks[i] for i in socks if results[i] is None], [], [], left)
        for sock in ready:
            family = ipaddress.ip_address(probes[by_fd[sock.fileno()]][1]).version
            while True:
                try:
                    data, ancillary, _, _ = sock.recvmsg(4096, 256)
                except BlockingIOError:
                    break
                got = _parse_reply(family, data)
                if got is None or got[0] != ident or got[1] not in sent:
                    continue        # another process's echo, or not an echo reply
                i, start = sent[got[1]]
                if results[i] is None:
                    results[i] = EchoResult(True, _ingress(ancillary),
                                            round((time.monotonic() - start) * 1000, 3))
