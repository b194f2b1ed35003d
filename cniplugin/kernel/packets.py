"""Pure build/parse of the Ethernet frames route-tune probes with: ARP (RFC 826/5227) and NDP NS/NA
(RFC 4861). No sockets here, so everything is unit-testable and fuzzable.

Parsers never raise: anything malformed, truncated or not what the caller asked for is ``None``.
"""

from __future__ import annotations

import ipaddress
import struct

from cniplugin.records.values import value

__all__ = [
    "ETH_P_ARP", "ETH_P_IPV6", "ARP_REQUEST", "ARP_REPLY", "ND_NS", "ND_NA", "BROADCAST",
    "ZERO_MAC", "NA_ROUTER", "NA_SOLICITED", "NA_OVERRIDE", "ArpPacket", "NdPacket",
    "mac_to_bytes", "mac_to_str", "solicited_node", "multicast_mac", "inet_checksum",
    "icmpv6_checksum", "build_arp", "parse_arp", "build_ns", "build_na", "parse_nd", "ALL_NODES",
    "Check", "Program", "bpf_program", "arp_sender_filter", "na_target_filter",
]

ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ARP_REQUEST = 1
ARP_REPLY = 2
ND_NS = 135
ND_NA = 136
BROADCAST = b"\xff" * 6
ZERO_MAC = b"\x00" * 6
NA_ROUTER, NA_SOLICITED, NA_OVERRIDE = 0x80, 0x40, 0x20
_OPT_SLLA, _OPT_TLLA = 1, 2
_IPPROTO_ICMPV6 = 58
_ND_HOP_LIMIT = 255  # RFC 4861: receivers drop NDP with any other hop limit (proves on-link origin)
_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IP6 = struct.Struct("!IHBB16s16s")
ALL_NODES = ipaddress.IPv6Address("ff02::1")


@value
class ArpPacket:
    """An Ethernet/IPv4 ARP packet (addresses as ``ipaddress`` objects, MACs as 6 bytes)."""

    eth_src: bytes
    op: int
    sender_mac: bytes
    sender_ip: ipaddress.IPv4Address
    target_mac: bytes
    target_ip: ipaddress.IPv4Address


@value
class NdPacket:
    """A validated Neighbor Solicitation or Advertisement.

    ``lladdr`` is the source (NS) or target (NA) link-layer address option, if present.
    """

    eth_src: bytes
    type: int
    src: ipaddress.IPv6Address
    dst: ipaddress.IPv6Address
    target: ipaddress.IPv6Address
    flags: int
    lladdr: bytes | None


def mac_to_bytes(mac: str) -> bytes:
    """``"0a:1b:..."`` -> 6 bytes; ValueError unless exactly six hex octets."""
    parts = mac.split(":")
    if len(parts) != 6 or any(len(p) != 2 for p in parts):
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(p, 16) for p in parts)


def mac_to_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def solicited_node(ip: ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    """ff02::1:ffXX:XXXX for the low 24 bits of ``ip`` (RFC 4291 §2.7.1)."""
    return ipaddress.IPv6Address(b"\xff\x02" + b"\x00" * 9 + b"\x01\xff" + ip.packed[13:])


def multicast_mac(ip: ipaddress.IPv6Address) -> bytes:
    """33:33 + the low 32 bits of an IPv6 multicast address (RFC 2464 §7)."""
    return b"\x33\x33" + ip.packed[12:]


def inet_checksum(data: bytes) -> int:
    """RFC 1071: the Internet checksum (one's complement of the one's-complement sum of
    ``data``'s 16-bit words, an odd length padded with a zero byte)."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmpv6_checksum(src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address, body: bytes) -> int:
    """RFC 4443 §2.3: one's-complement sum over pseudo-header + message (checksum field zero)."""
    return inet_checksum(src.packed + dst.packed
                         + struct.pack("!I3xB", len(body), _IPPROTO_ICMPV6) + body)


def build_arp(op: int, eth_src: bytes, sender_ip: str | ipaddress.IPv4Address,
              target_ip: str | ipaddress.IPv4Address, *, dst: bytes = BROADCAST,
              target_mac: bytes = ZERO_MAC) -> bytes:
    """An Ethernet ARP frame whose sender MAC is ``eth_src``.

    RFC 5227 probe: ``sender_ip="0.0.0.0"``; announcement: ``sender_ip == target_ip``.
    """
    arp = _ARP.pack(1, 0x0800, 6, 4, op, eth_src, ipaddress.IPv4Address(sender_ip).packed,
                    target_mac, ipaddress.IPv4Address(target_ip).packed)
    return _ETH.pack(dst, eth_src, ETH_P_ARP) + arp


def parse_arp(frame: bytes) -> ArpPacket | None:
    """An Ethernet/IPv4 ARP request or reply, else None (trailing padding is allowed)."""
    if len(frame) < _ETH.size + _ARP.size:
        return None
    _dst, eth_src, ethertype = _ETH.unpack_from(frame)
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(frame, _ETH.size)
    if (ethertype, htype, ptype, hlen, plen) != (ETH_P_ARP, 1, 0x0800, 6, 4):
        return None
    if op not in (ARP_REQUEST, ARP_REPLY):
        return None
    return ArpPacket(eth_src, op, sha, ipaddress.IPv4Address(spa), tha, ipaddress.IPv4Address(tpa))


def _ipv6_frame(eth_src: bytes, eth_dst: bytes, src: ipaddress.IPv6Address,
                dst: ipaddress.IPv6Address, body: bytearray) -> bytes:
    struct.pack_into("!H", body, 2, icmpv6_checksum(src, dst, bytes(body)))
    ip6 = _IP6.pack(6 << 28, len(body), _IPPROTO_ICMPV6, _ND_HOP_LIMIT, src.packed, dst.packed)
    return _ETH.pack(eth_dst, eth_src, ETH_P_IPV6) + ip6 + bytes(body)


def build_ns(eth_src: bytes, src: str | ipaddress.IPv6Address,
             target: str | ipaddress.IPv6Address) -> bytes:
    """NS for ``target`` to its solicited-node group.

    With ``src == "::"`` it is a DAD-style probe and (RFC 4861 §4.3) carries no source LL option;
    otherwise the option announces ``eth_src`` so the target can answer by unicast.
    """
    src, target = ipaddress.IPv6Address(src), ipaddress.IPv6Address(target)
    group = solicited_node(target)
    body = bytearray(struct.pack("!BBHI16s", ND_NS, 0, 0, 0, target.packed))
    if not src.is_unspecified:
        body += struct.pack("!BB6s", _OPT_SLLA, 1, eth_src)
    return _ipv6_frame(eth_src, multicast_mac(group), src, group, body)


def build_na(eth_src: bytes, src: str | ipaddress.IPv6Address, target: str | ipaddress.IPv6Address,
             *, dst: str | ipaddress.IPv6Address = ALL_NODES, eth_dst: bytes | None = None,
             flags: int = NA_OVERRIDE) -> bytes:
    """NA for ``target``, target LL option = ``eth_src``; by default unsolicited, to ff02::1."""
    src, target, dst = (ipaddress.IPv6Address(a) for a in (src, target, dst))
    if eth_dst is None:
        eth_dst = multicast_mac(dst)
    body = bytearray(struct.pack("!BBHB3x16s", ND_NA, 0, 0, flags, target.packed))
    body += struct.pack("!BB6s", _OPT_TLLA, 1, eth_src)
    return _ipv6_frame(eth_src, eth_dst, src, dst, body)


def _nd_lladdr(options: bytes, wanted: int) -> tuple[bool, bytes | None]:
    """(valid, lladdr of option type ``wanted``); an option of length 0 invalidates the packet."""
    found = None
    while options:
        if len(options) < 2 or options[1] == 0 or len(options) < options[1] * 8:
            return False, None
        kind, size = options[0], options[1] * 8
        if kind == wanted and size >= 8:
            found = options[2:8]
        options = options[size:]
    return True, found


def parse_nd(frame: bytes) -> NdPacket | None:
    """A NS/NA passing RFC 4861 §7.1 validation (hop limit 255, code 0, checksum, lengths),
    else None."""
    if len(frame) < _ETH.size + _IP6.size + 24:
        return None
    _dst, eth_src, ethertype = _ETH.unpack_from(frame)
    vtcfl, plen, nxt, hlim, src, dst = _IP6.unpack_from(frame, _ETH.size)
    if (ethertype, vtcfl >> 28, nxt, hlim) != (ETH_P_IPV6, 6, _IPPROTO_ICMPV6, _ND_HOP_LIMIT):
        return None
    body = frame[_ETH.size + _IP6.size:][:plen]
    if plen < 24 or len(body) != plen:
        return None
    kind, code = body[0], body[1]
    if kind not in (ND_NS, ND_NA) or code != 0:
        return None
    src_ip, dst_ip = ipaddress.IPv6Address(src), ipaddress.IPv6Address(dst)
    zeroed = body[:2] + b"\x00\x00" + body[4:]
    if icmpv6_checksum(src_ip, dst_ip, zeroed) != struct.unpack_from("!H", body, 2)[0]:
        return None
    target = ipaddress.IPv6Address(body[8:24])
    if target.is_multicast:
        return None
    valid, lladdr = _nd_lladdr(body[24:], _OPT_SLLA if kind == ND_NS else _OPT_TLLA)
    if not valid:
        return None
    flags = body[4] if kind == ND_NA else 0
    if kind == ND_NA and dst_ip.is_multicast and flags & NA_SOLICITED:
        return None
    if kind == ND_NS and src_ip.is_unspecified and (lladdr is not None or not dst_ip.is_multicast):
        return None
    return NdPacket(eth_src, kind, src_ip, dst_ip, target, flags, lladdr)


# --- classic BPF (linux/filter.h) matchers for the frames above --------------------------------
# They only save wake-ups on a busy rail; the parsers above re-validate every frame anyway.

_BPF_LD_ABS = {1: 0x30, 2: 0x28, 4: 0x20}  # BPF_LD | BPF_{B,H,W} | BPF_ABS
_BPF_JEQ_K = 0x15
_BPF_RET_K = 0x06
_BPF_SNAPLEN = 0x40000
Check = tuple[int, int, int]  # (size in bytes, offset from the Ethernet header, expected value)
Program = list[tuple[int, int, int, int]]  # struct sock_filter: (code, jt, jf, k)


def bpf_program(common: list[Check], alternatives: list[list[Check]]
                ) -> Program | None:
    """Instructions accepting frames that pass every ``common`` check and all checks of at least
    one alternative; None if the program would need jumps longer than BPF's 255 (too many targets).
    """
    code: list[tuple[int, object, object, int]] = []  # (op, jt label, jf label, k)
    starts: list[int] = []
    for size, off, val in common:
        code += [(_BPF_LD_ABS[size], 0, 0, off), (_BPF_JEQ_K, None, "reject", val)]
    for i, alt in enumerate(alternatives):
        starts.append(len(code))
        for j, (size, off, val) in enumerate(alt):
            last = j == len(alt) - 1
            code += [(_BPF_LD_ABS[size], 0, 0, off),
                     (_BPF_JEQ_K, "accept" if last else None, ("alt", i + 1), val)]
    labels = {"accept": len(code), "reject": len(code) + 1}
    labels.update({("alt", i): s for i, s in enumerate(starts)})
    labels[("alt", len(alternatives))] = labels["reject"]
    program = []
    for index, (op, jt, jf, k) in enumerate(code):
        if op == _BPF_JEQ_K:
            jt = 0 if jt is None else labels[jt] - index - 1
            jf = labels[jf] - index - 1
            if max(jt, jf) > 255:
                return None
        program.append((op, jt, jf, k))
    return program + [(_BPF_RET_K, 0, 0, _BPF_SNAPLEN), (_BPF_RET_K, 0, 0, 0)]


def arp_sender_filter(ips: list[ipaddress.IPv4Address]) -> Program | None:
    """ARP frames whose sender IP is one of ``ips``."""
    return bpf_program([(2, 12, ETH_P_ARP)], [[(4, 28, int(ip))] for ip in ips])


def na_target_filter(ips: list[ipaddress.IPv6Address]) -> Program | None:
    """NAs (no extension headers, as RFC 4861 NDP is sent) whose target is one of ``ips``."""
    common = [(2, 12, ETH_P_IPV6), (1, 20, _IPPROTO_ICMPV6), (1, 54, ND_NA)]
    alts = [[(4, 62 + 4 * w, int.from_bytes(ip.packed[4 * w:4 * w + 4], "big")) for w in range(4)]
            for ip in ips]
    return bpf_program(common, alts)
