"""Pure tests of ARP/NDP frame building and parsing, the BPF matchers, and the MAC-prefix rule."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cniplugin.kernel import packets as pk
from cniplugin.kernel import probe as _probe
from cniplugin.kernel.probe import ProbeOptions, mac_from_prefix

POD_MAC = pk.mac_to_bytes("6a:78:63:5f:93:c7")
GW_MAC = pk.mac_to_bytes("ae:ad:a8:7a:cb:c5")
V6 = ipaddress.IPv6Address

# Frames the Linux 6.18 kernel sent (tcpdump -xx): the pod (fd77::10 / 10.77.0.10) resolving its
# gateway (fd77::1 / 10.77.0.1), and the gateway's answers. Known-good bytes and checksums.
KERNEL_NS = bytes.fromhex(
    "3333ff0000016a78635f93c786dd6000000000203afffd77000000000000000000000000"
    "0010ff0200000000000000000001ff00000187001cfe00000000fd770000000000000000"
    "0000000000010101" "6a78635f93c7")
KERNEL_NA = bytes.fromhex(
    "6a78635f93c7aeada87acbc586dd6000000000203afffd77000000000000000000000000"
    "0001fd770000000000000000000000000010" "8800fa3b60000000fd770000000000000000"
    "0000000000010201" "aeada87acbc5")
KERNEL_ARP_REQUEST = bytes.fromhex(
    "ffffffffffff6a78635f93c708060001080006040001" "6a78635f93c70a4d000a0000000000000a4d0001")
KERNEL_ARP_REPLY = bytes.fromhex(
    "6a78635f93c7aeada87acbc508060001080006040002" "aeada87acbc50a4d00016a78635f93c70a4d000a")


# --- building matches the kernel, byte for byte ------------------------------------------------

def test_ns_with_source_ll_matches_kernel() -> None:
    assert pk.build_ns(POD_MAC, "fd77::10", "fd77::1") == KERNEL_NS


def test_solicited_na_matches_kernel() -> None:
    frame = pk.build_na(GW_MAC, "fd77::1", "fd77::1", dst="fd77::10", eth_dst=POD_MAC,
                        flags=pk.NA_SOLICITED | pk.NA_OVERRIDE)
    assert frame == KERNEL_NA


def test_arp_matches_kernel() -> None:
    assert pk.build_arp(pk.ARP_REQUEST, POD_MAC, "10.77.0.10", "10.77.0.1") == KERNEL_ARP_REQUEST
    reply = pk.build_arp(pk.ARP_REPLY, GW_MAC, "10.77.0.1", "10.77.0.10", dst=POD_MAC,
                         target_mac=POD_MAC)
    assert reply == KERNEL_ARP_REPLY


@pytest.mark.parametrize(("frame", "expected"), [(KERNEL_NS, 0x1CFE), (KERNEL_NA, 0xFA3B)])
def test_icmpv6_checksum_of_kernel_frames(frame: bytes, expected: int) -> None:
    src, dst, body = V6(frame[22:38]), V6(frame[38:54]), frame[54:]
    assert pk.icmpv6_checksum(src, dst, body[:2] + b"\0\0" + body[4:]) == expected


def test_inet_checksum_rfc1071_and_an_icmp_echo() -> None:
    """RFC 1071 §3's worked example, an odd length (zero-padded), and an echo request the
    kernel's own checksum accepts (a message with its checksum in place sums to zero)."""
    assert pk.inet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert pk.inet_checksum(b"\x01") == pk.inet_checksum(b"\x01\x00") == 0xFEFF
    echo = bytes.fromhex("0800") + b"\0\0" + bytes.fromhex("12340001") + b"route-tune-reach"
    csum = pk.inet_checksum(echo)
    assert pk.inet_checksum(echo[:2] + csum.to_bytes(2, "big") + echo[4:]) == 0


# --- parsing --------------------------------------------------------------------------------

def test_parse_kernel_frames() -> None:
    ns = pk.parse_nd(KERNEL_NS)
    assert ns == pk.NdPacket(POD_MAC, pk.ND_NS, V6("fd77::10"), V6("ff02::1:ff00:1"),
                             V6("fd77::1"), 0, POD_MAC)
    na = pk.parse_nd(KERNEL_NA)
    assert na is not None and na.type == pk.ND_NA and na.target == V6("fd77::1")
    assert na.flags == pk.NA_SOLICITED | pk.NA_OVERRIDE and na.lladdr == GW_MAC
    arp = pk.parse_arp(KERNEL_ARP_REPLY)
    assert arp == pk.ArpPacket(GW_MAC, pk.ARP_REPLY, GW_MAC, ipaddress.IPv4Address("10.77.0.1"),
                               POD_MAC, ipaddress.IPv4Address("10.77.0.10"))


def test_dad_probe_ns() -> None:
    frame = pk.build_ns(POD_MAC, "::", "fd77::1234:5678")
    assert frame[:6] == bytes.fromhex("3333ff345678")  # solicited-node group's MAC
    assert frame[21] == 255  # hop limit
    ns = pk.parse_nd(frame)
    assert ns is not None and ns.src == V6("::") and ns.lladdr is None  # no SLLA from ::
    assert ns.dst == V6("ff02::1:ff34:5678") and ns.target == V6("fd77::1234:5678")


def test_unsolicited_na() -> None:
    na = pk.parse_nd(pk.build_na(POD_MAC, "fd77::10", "fd77::10"))
    assert na is not None and na.dst == pk.ALL_NODES and na.lladdr == POD_MAC
    assert na.flags == pk.NA_OVERRIDE  # override, not solicited, not router


def test_arp_probe_and_announcement() -> None:
    probe = pk.parse_arp(pk.build_arp(pk.ARP_REQUEST, POD_MAC, "0.0.0.0", "10.1.2.3"))
    assert probe is not None and str(probe.sender_ip) == "0.0.0.0" and probe.sender_mac == POD_MAC
    garp = pk.parse_arp(pk.build_arp(pk.ARP_REQUEST, POD_MAC, "10.1.2.3", "10.1.2.3"))
    assert garp is not None and garp.sender_ip == garp.target_ip


def test_arp_with_ethernet_padding_parses() -> None:
    assert pk.parse_arp(KERNEL_ARP_REPLY + b"\0" * 18) is not None  # 60-byte minimum frame


@pytest.mark.parametrize("frame", [KERNEL_NS, KERNEL_NA, KERNEL_ARP_REQUEST])
def test_every_truncation_is_ignored(frame: bytes) -> None:
    parse = pk.parse_arp if frame is KERNEL_ARP_REQUEST else pk.parse_nd
    for n in range(len(frame)):
        assert parse(frame[:n]) is None


def _patched(frame: bytes, offset: int, value: bytes) -> bytes:
    return frame[:offset] + value + frame[offset + len(value):]


@pytest.mark.parametrize(("offset", "value"), [
    (12, b"\x08\x00"),       # not IPv6
    (21, b"\xfe"),           # hop limit 254: not on-link
    (20, b"\x11"),           # UDP, not ICMPv6
    (55, b"\x01"),           # ICMP code 1
    (56, b"\x00\x00"),       # checksum wrong
    (79, b"\x00"),           # option length 0 (RFC 4861: discard)
    (62, b"\xff"),           # multicast target
    (18, b"\x00\x40"),       # payload length beyond the frame
])
def test_invalid_na_is_ignored(offset: int, value: bytes) -> None:
    assert pk.parse_nd(KERNEL_NA) is not None
    assert pk.parse_nd(_patched(KERNEL_NA, offset, value)) is None


def test_solicited_na_to_multicast_is_ignored() -> None:
    frame = pk.build_na(GW_MAC, "fd77::1", "fd77::1", flags=pk.NA_SOLICITED)
    assert pk.parse_nd(frame) is None


@pytest.mark.parametrize(("offset", "value"), [
    (12, b"\x86\xdd"), (14, b"\x00\x06"), (16, b"\x86\xdd"), (18, b"\x08"), (20, b"\x00\x03"),
])
def test_invalid_arp_is_ignored(offset: int, value: bytes) -> None:
    assert pk.parse_arp(_patched(KERNEL_ARP_REPLY, offset, value)) is None


# --- what the checks make of frames ----------------------------------------------------------

def test_arp_classifier_ignores_own_mac_and_filters_operation() -> None:
    mine = _probe._arp_classifier(POD_MAC, pk.ARP_REPLY)
    assert mine(KERNEL_ARP_REPLY) == (ipaddress.IPv4Address("10.77.0.1"), GW_MAC)
    assert mine(KERNEL_ARP_REQUEST) is None  # a request is no gateway answer
    assert _probe._arp_classifier(GW_MAC, None)(KERNEL_ARP_REPLY) is None  # our own MAC
    assert _probe._arp_classifier(GW_MAC, None)(KERNEL_ARP_REQUEST) == (
        ipaddress.IPv4Address("10.77.0.10"), POD_MAC)


def test_na_classifier() -> None:
    assert _probe._na_classifier(POD_MAC)(KERNEL_NA) == (V6("fd77::1"), GW_MAC)
    assert _probe._na_classifier(GW_MAC)(KERNEL_NA) is None
    assert _probe._na_classifier(GW_MAC)(KERNEL_NS) is None  # NS is not an answer


def _run_bpf(program: list[tuple[int, int, int, int]], frame: bytes) -> int:
    """A classic-BPF interpreter for the few instructions the matchers use."""
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        if code in (0x20, 0x28, 0x30):
            size = {0x20: 4, 0x28: 2, 0x30: 1}[code]
            if k + size > len(frame):
                return 0  # the kernel rejects out-of-bounds loads
            acc = int.from_bytes(frame[k:k + size], "big")
        elif code == 0x15:
            pc += jt if acc == k else jf
        elif code == 0x06:
            return k
        pc += 1


def test_bpf_matchers_accept_only_their_targets() -> None:
    arp = pk.arp_sender_filter([ipaddress.IPv4Address(a) for a in ("10.9.9.9", "10.77.0.1")])
    assert _run_bpf(arp, KERNEL_ARP_REPLY) > 0
    assert _run_bpf(arp, KERNEL_ARP_REQUEST) == 0  # sender 10.77.0.10
    assert _run_bpf(arp, KERNEL_NA) == 0
    na = pk.na_target_filter([V6("fd77::1"), V6("fd77::2")])
    assert _run_bpf(na, KERNEL_NA) > 0
    assert _run_bpf(na, KERNEL_NS) == 0
    assert _run_bpf(pk.na_target_filter([V6("fd77::3")]), KERNEL_NA) == 0
    assert _run_bpf(na, KERNEL_NA[:40]) == 0


def test_bpf_matcher_with_too_many_targets_is_dropped() -> None:
    many = [V6(f"fd77::{i:x}") for i in range(1, 40)]
    assert pk.na_target_filter(many) is None  # user-space filtering still applies


# --- fuzz -----------------------------------------------------------------------------------

@settings(max_examples=2000)
@given(st.binary(max_size=200))
def test_parsers_never_raise_on_random_bytes(data: bytes) -> None:
    pk.parse_arp(data)
    pk.parse_nd(data)
    _probe._na_classifier(POD_MAC)(data)
    _probe._arp_classifier(POD_MAC, None)(data)


@settings(max_examples=2000)
@given(st.sampled_from([KERNEL_NS, KERNEL_NA, KERNEL_ARP_REPLY]),
       st.lists(st.tuples(st.integers(0, 85), st.integers(0, 255)), max_size=6),
       st.integers(0, 90), st.binary(max_size=40))
def test_parsers_never_raise_on_mutated_frames(frame: bytes, flips, cut: int, tail: bytes) -> None:
    buf = bytearray(frame)
    for offset, value in flips:
        if offset < len(buf):
            buf[offset] = value
    mutated = bytes(buf[:cut]) + tail
    for result in (pk.parse_arp(mutated), pk.parse_nd(mutated)):
        assert result is None or isinstance(result, (pk.ArpPacket, pk.NdPacket))


# --- MAC prefix and options ------------------------------------------------------------------

@pytest.mark.parametrize(("prefix", "ip", "mac"), [
    ("0a:1b", "172.16.11.10", "0a:1b:ac:10:0b:0a"),   # coordinator's documented example
    ("0a:1b", "172.16.11.10/24", "0a:1b:ac:10:0b:0a"),
    ("0A:1B", "10.0.0.1", "0a:1b:0a:00:00:01"),
    ("02:00", "fd00::ac10:b0a", "02:00:ac:10:0b:0a"),  # IPv6: the last 4 bytes
    ("00:00", "2001:db8::1/64", "00:00:00:00:00:01"),
])
def test_mac_from_prefix(prefix: str, ip: str, mac: str) -> None:
    assert mac_from_prefix(prefix, ip) == mac


@pytest.mark.parametrize(("prefix", "ip", "reason"), [
    ("0b:1b", "10.0.0.1", "multicast"), ("ff:ff", "10.0.0.1", "multicast"),
    ("0a1b", "10.0.0.1", "xx:xx"), ("0a:1b:2c", "10.0.0.1", "xx:xx"),
    ("zz:00", "10.0.0.1", "xx:xx"),
    ("a:1b", "10.0.0.1", "xx:xx"), ("", "10.0.0.1", "xx:xx"), ("0a:1b", "10.0.0.256", "10.0.0.256"),
])
def test_mac_from_prefix_rejects(prefix: str, ip: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        mac_from_prefix(prefix, ip)


def test_probe_options() -> None:
    assert ProbeOptions().bound == pytest.approx(0.120)  # 2 x 10 ms spacing + 100 ms
    assert ProbeOptions(retries=3, interval=1.0, timeout=0.1).bound == pytest.approx(0.300)
    for bad in ({"retries": 0}, {"timeout": 0}, {"interval": -1}):
        with pytest.raises(ValueError):
            ProbeOptions(**bad)
