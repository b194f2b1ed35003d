"""Real-packet tests of ``kernel.probe`` on a private L2 segment made of network namespaces.

Topology (every name carries the rtD tag; the root namespace is never touched)::

    rtD-pod-*  rtDpod0 ─┐
    rtD-gw-*   rtDgw0  ─┼─ rtDbr0 (bridge in rtD-sw-*, mcast_snooping off so that
    rtD-sq-*   rtDsq0  ─┘          solicited-node multicast always floods)

The pod holds 10.77.0.10/24 and fd77::10/64, the gateway 10.77.0.1/24 and fd77::1/64; the squatter
gets whatever address a test wants to steal. The probe API runs in a thread that setns()'d into
the pod, as the engine calls it.
"""

from __future__ import annotations

import re
import select
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pytest

from harness.host import in_netns, require_root

from cniplugin.kernel import packets as pk
from cniplugin.protocol.errors import GatewayUnreachable, InterfaceNotFound, IPConflict, TryAgainLater
from cniplugin.kernel.probe import (ProbeOptions, announce, check_conflicts, check_gateways,
                              mac_from_prefix, probe_interface, wait_dad)
from cniplugin.kernel.rawsock import wait_sockets_closed

pytestmark = pytest.mark.netns
T = TypeVar("T")
ETH_P_ALL = 0x0003
POD4, GW4, DEAD4 = "10.77.0.10", "10.77.0.1", "10.77.0.99"
POD6, GW6, DEAD6 = "fd77::10", "fd77::1", "fd77::99"
DEFAULTS = ProbeOptions()
SLACK = 0.5  # generous scheduling slack on a loaded 2-core VM, for the documented bounds only


def sh(*argv: str, netns: str | None = None, check: bool = True) -> str:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    proc = subprocess.run([*prefix, *argv], capture_output=True, text=True)
    assert proc.returncode == 0 or not check, f"{argv}: {proc.stderr}"
    return proc.stdout


def _timed(fn: Callable[..., object], *args, **kwargs) -> tuple[float, Exception | None]:
    """(seconds, exception or None) of one call, timed where it runs."""
    start = time.perf_counter()
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - handed to the test
        return time.perf_counter() - start, exc
    return time.perf_counter() - start, None


@dataclass
class Segment:
    pod: str
    gw: str
    sq: str
    sw: str

    def mac(self, ns: str, ifname: str) -> str:
        return re.search(r"link/ether (\S+)", sh("ip", "-n", ns, "link", "show", ifname))[1]

    @property
    def pod_mac(self) -> str:
        return self.mac(self.pod, "rtDpod0")

    @property
    def sq_mac(self) -> str:
        return self.mac(self.sq, "rtDsq0")

    def in_pod(self, fn: Callable[..., T], *args, **kwargs) -> T:
        return in_netns(self.pod, lambda: fn(*args, **kwargs))

    def timed_in_pod(self, fn: Callable[..., object], *args, **kwargs
                     ) -> tuple[float, BaseException | None]:
        return in_netns(self.pod, lambda: _timed(fn, *args, **kwargs))

    def gw_neigh(self, ip: str) -> str:
        """The gateway's neighbour entry for ``ip`` (lladdr and state), '' if none."""
        return sh("ip", "-n", self.gw, "neigh", "show", ip, "dev", "rtDgw0").strip()


@pytest.fixture(scope="module")
def segment() -> Iterator[Segment]:
    require_root("ip")
    tag = uuid.uuid4().hex[:5]
    seg = Segment(*(f"rtD-{role}-{tag}" for role in ("pod", "gw", "sq", "sw")))
    try:
        for ns in (seg.pod, seg.gw, seg.sq, seg.sw):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", seg.sw, "link", "add", "rtDbr0", "type", "bridge", "mcast_snooping", "0")
        sh("ip", "-n", seg.sw, "link", "set", "rtDbr0", "up")
        for role, ns in (("pod", seg.pod), ("gw", seg.gw), ("sq", seg.sq)):
            sh("ip", "-n", ns, "link", "add", f"rtD{role}0", "type", "veth", "peer", "name",
               f"rtDs{role}", "netns", seg.sw)
            sh("ip", "-n", seg.sw, "link", "set", f"rtDs{role}", "master", "rtDbr0", "up")
            sh("ip", "-n", ns, "link", "set", f"rtD{role}0", "up")
        sh("ip", "-n", seg.pod, "addr", "add", f"{POD4}/24", "dev", "rtDpod0")
        sh("ip", "-n", seg.pod, "addr", "add", f"{POD6}/64", "dev", "rtDpod0", "nodad")
        sh("ip", "-n", seg.gw, "addr", "add", f"{GW4}/24", "dev", "rtDgw0")
        sh("ip", "-n", seg.gw, "addr", "add", f"{GW6}/64", "dev", "rtDgw0", "nodad")
        yield seg
    finally:
        for ns in (seg.pod, seg.gw, seg.sq, seg.sw):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def seg(segment: Segment) -> Iterator[Segment]:
    """The segment, with neighbour caches flushed before and the squatter emptied after."""
    original_mac = segment.pod_mac
    for ns in (segment.pod, segment.gw, segment.sq):
        sh("ip", "-n", ns, "neigh", "flush", "all")
    try:
        yield segment
    finally:
        sh("ip", "-n", segment.sq, "addr", "flush", "dev", "rtDsq0", "scope", "global")
        sh("ip", "-n", segment.pod, "link", "set", "rtDpod0", "address", original_mac)
        for key in ("ipv4.conf.rtDgw0.arp_accept", "ipv6.conf.rtDgw0.accept_untracked_na",
                    "ipv6.conf.rtDgw0.forwarding"):
            sh("sysctl", "-qw", f"net.{key}=0", netns=segment.gw)


def squat(seg: Segment, cidr: str) -> None:
    extra = ["nodad"] if ":" in cidr else []
    sh("ip", "-n", seg.sq, "addr", "add", cidr, "dev", "rtDsq0", *extra)


class Capture:
    """An ETH_P_ALL packet socket in the gateway namespace: what arrived there, in order."""

    def __init__(self, seg: Segment) -> None:
        def open_sock() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.bind(("rtDgw0", ETH_P_ALL))
            return s
        self.sock = in_netns(seg.gw, open_sock)

    def frames(self) -> list[bytes]:
        """Everything received so far (waits until the segment was quiet for a moment)."""
        got = []
        with self.sock:
            while select.select([self.sock], [], [], 0.2)[0]:
                frame, addr = self.sock.recvfrom(65535)
                if addr[2] != 4:  # not the gateway's own transmissions
                    got.append(frame)
        return got

    def arps(self) -> list[pk.ArpPacket]:
        return [p for p in map(pk.parse_arp, self.frames()) if p]

    def nds(self) -> list[pk.NdPacket]:
        return [p for p in map(pk.parse_nd, self.frames()) if p]


def packet_sockets(seg: Segment) -> int:
    """Packet sockets open in the pod netns (after the background closes finished)."""
    wait_sockets_closed()
    return in_netns(seg.pod, lambda: len(open("/proc/thread-self/net/packet").readlines()) - 1)


# --- IPv4 -------------------------------------------------------------------------------------

def test_live_gateway_v4_answers_within_one_round_trip(seg: Segment) -> None:
    # Generous timeout and interval: only an immediate return on the reply keeps this short.
    opts = ProbeOptions(retries=3, interval=2.0, timeout=5.0)
    cap = Capture(seg)
    elapsed, exc = seg.timed_in_pod(check_gateways, "rtDpod0", [(POD4, GW4)], opts)
    assert exc is None
    assert elapsed < 1.0, elapsed  # far less than one timeout: confirmed by the first reply
    requests = [a for a in cap.arps() if a.op == pk.ARP_REQUEST]
    assert len(requests) == 1 and str(requests[0].sender_ip) == POD4
    assert packet_sockets(seg) == 0


def test_dead_gateway_v4_fails_within_bound(seg: Segment) -> None:
    cap = Capture(seg)
    elapsed, exc = seg.timed_in_pod(check_gateways, "rtDpod0", [(POD4, DEAD4)], DEFAULTS)
    assert isinstance(exc, GatewayUnreachable) and exc.code == 11
    msg = str(exc)
    for part in ("rtDpod0", DEAD4, "3 ARP request", " ms", "check that", "L2 segment"):
        assert part in msg
    assert DEFAULTS.bound <= elapsed <= DEFAULTS.retries * DEFAULTS.timeout + SLACK, elapsed
    probes = [a for a in cap.arps() if str(a.target_ip) == DEAD4]
    assert len(probes) == DEFAULTS.retries  # the retries really went out on the wire
    assert packet_sockets(seg) == 0


def test_reply_for_another_address_does_not_confirm(seg: Segment) -> None:
    elapsed, exc = seg.timed_in_pod(check_gateways, "rtDpod0", [(POD4, GW4), (POD4, DEAD4)],
                                    DEFAULTS)
    assert isinstance(exc, GatewayUnreachable)
    assert f"gateway {DEAD4} is unreachable" in str(exc) and f"gateway {GW4}" not in str(exc)


@pytest.mark.parametrize("address", [f"{POD4}/24", f"{POD6}/64"], ids=["v4", "v6"])
def test_conflict_names_holder_mac(seg: Segment, address: str) -> None:
    squat(seg, address)
    _, exc = seg.timed_in_pod(check_conflicts, "rtDpod0", [address], DEFAULTS)
    assert isinstance(exc, IPConflict) and exc.code == 101
    assert seg.sq_mac in str(exc) and address.split("/")[0] in str(exc) and "rtDpod0" in str(exc)


def test_no_conflict_v4_waits_the_window_and_teaches_nobody(seg: Segment) -> None:
    cap = Capture(seg)
    elapsed, exc = seg.timed_in_pod(check_conflicts, "rtDpod0", [f"{POD4}/24"], DEFAULTS)
    assert exc is None
    assert DEFAULTS.bound <= elapsed <= DEFAULTS.retries * DEFAULTS.timeout + SLACK
    probes = [a for a in cap.arps() if str(a.target_ip) == POD4]
    assert len(probes) == DEFAULTS.retries
    assert all(str(p.sender_ip) == "0.0.0.0" for p in probes)  # RFC 5227 probe
    assert seg.gw_neigh(POD4) == ""  # the gateway learnt nothing from the probes


def test_conflict_stops_before_any_gateway_probe(seg: Segment) -> None:
    """#4475: a gateway probe from an address someone else holds would poison the gateway."""
    squat(seg, f"{POD4}/24")
    cap = Capture(seg)
    _, exc = seg.timed_in_pod(probe_interface, "rtDpod0", [f"{POD4}/24"], [GW4], DEFAULTS,
                              conflict=True, gateway=True)
    assert isinstance(exc, IPConflict)
    assert all(str(a.sender_ip) != POD4 for a in cap.arps() if a.sender_mac != pk.mac_to_bytes(
        seg.sq_mac))
    assert seg.gw_neigh(POD4) == ""


def test_probe_interface_orders_conflict_then_gateway(seg: Segment) -> None:
    cap = Capture(seg)
    _, exc = seg.timed_in_pod(probe_interface, "rtDpod0", [f"{POD4}/24", f"{POD6}/64"],
                              [GW4, GW6], DEFAULTS, conflict=True, gateway=True)
    assert exc is None
    kinds = []
    for frame in cap.frames():
        arp, nd = pk.parse_arp(frame), pk.parse_nd(frame)
        if arp and arp.op == pk.ARP_REQUEST:
            kinds.append("conflict" if str(arp.sender_ip) == "0.0.0.0" else "gateway")
        elif nd and nd.type == pk.ND_NS:
            kinds.append("conflict" if nd.src.is_unspecified else "gateway")
    assert kinds.count("conflict") == 2 * DEFAULTS.retries and "gateway" in kinds
    # no gateway probe before the last conflict probe
    assert kinds == sorted(kinds, key=lambda k: k == "gateway")


# --- IPv6 -------------------------------------------------------------------------------------

def test_live_gateway_v6_answers_within_one_round_trip(seg: Segment) -> None:
    opts = ProbeOptions(retries=3, interval=2.0, timeout=5.0)
    cap = Capture(seg)
    elapsed, exc = seg.timed_in_pod(check_gateways, "rtDpod0", [(POD6, GW6)], opts)
    assert exc is None and elapsed < 1.0, (elapsed, exc)
    ns = [p for p in cap.nds() if p.type == pk.ND_NS and str(p.target) == GW6]
    assert len(ns) == 1 and str(ns[0].src) == POD6 and ns[0].lladdr == pk.mac_to_bytes(seg.pod_mac)


def test_dead_gateway_v6_fails_within_bound(seg: Segment) -> None:
    cap = Capture(seg)
    elapsed, exc = seg.timed_in_pod(check_gateways, "rtDpod0", [(POD6, DEAD6)], DEFAULTS)
    assert isinstance(exc, GatewayUnreachable) and exc.code == 11
    for part in ("rtDpod0", DEAD6, "3 neighbor solicitation", " ms", "NDP"):
        assert part in str(exc)
    assert DEFAULTS.bound <= elapsed <= DEFAULTS.retries * DEFAULTS.timeout + SLACK, elapsed
    assert len([p for p in cap.nds() if str(p.target) == DEAD6]) == DEFAULTS.retries


def test_no_conflict_v6_sends_dad_probes(seg: Segment) -> None:
    cap = Capture(seg)
    elapsed, exc = seg.timed_in_pod(check_conflicts, "rtDpod0", [f"{POD6}/64"], DEFAULTS)
    assert exc is None and elapsed >= DEFAULTS.bound
    probes = [p for p in cap.nds() if p.type == pk.ND_NS and str(p.target) == POD6]
    assert len(probes) == DEFAULTS.retries
    assert all(p.src.is_unspecified and p.lladdr is None and str(p.dst) == "ff02::1:ff00:10"
               for p in probes)
    assert seg.gw_neigh(POD6) == ""


def test_gateway_probe_waits_for_dad_of_its_source(seg: Segment) -> None:
    tentative = "fd77::20"
    sh("ip", "-n", seg.pod, "addr", "add", f"{tentative}/64", "dev", "rtDpod0")  # with DAD
    try:
        cap = Capture(seg)
        elapsed, exc = seg.timed_in_pod(check_gateways, "rtDpod0", [(tentative, GW6)], DEFAULTS)
        assert exc is None
        assert "tentative" not in sh("ip", "-n", seg.pod, "addr", "show", "dev", "rtDpod0")
        sources = [str(p.src) for p in cap.nds() if p.type == pk.ND_NS and str(p.target) == GW6]
        assert sources == [tentative]
    finally:
        sh("ip", "-n", seg.pod, "addr", "del", f"{tentative}/64", "dev", "rtDpod0", check=False)


def test_wait_dad_reports_kernel_dad_failure(seg: Segment) -> None:
    taken = "fd77::30"
    squat(seg, f"{taken}/64")
    sh("ip", "-n", seg.pod, "addr", "add", f"{taken}/64", "dev", "rtDpod0")  # kernel DAD fails
    try:
        _, exc = seg.timed_in_pod(wait_dad, "rtDpod0", taken)
        assert isinstance(exc, IPConflict) and taken in str(exc)
    finally:
        sh("ip", "-n", seg.pod, "addr", "del", f"{taken}/64", "dev", "rtDpod0", check=False)


# --- announcements and the MAC prefix -----------------------------------------------------------

def _rewrite_pod_mac(seg: Segment) -> str:
    mac = mac_from_prefix("0a:1b", POD4)
    sh("ip", "-n", seg.pod, "link", "set", "rtDpod0", "address", mac)
    assert seg.pod_mac == mac == "0a:1b:0a:4d:00:0a"
    return mac


def test_garp_replaces_stale_entry_with_rewritten_mac(seg: Segment) -> None:
    # Default sysctls: Linux lets a gratuitous ARP update an *existing* entry (is_garp overrides
    # the locktime), but never creates one unless arp_accept is set (next test).
    sh("ip", "-n", seg.gw, "neigh", "replace", POD4, "lladdr", "02:00:00:00:00:99", "dev",
       "rtDgw0", "nud", "stale")
    mac = _rewrite_pod_mac(seg)
    cap = Capture(seg)
    seg.in_pod(announce, "rtDpod0", [f"{POD4}/24"])
    garps = [a for a in cap.arps() if a.sender_ip == a.target_ip and str(a.sender_ip) == POD4]
    assert len(garps) == 1 and pk.mac_to_str(garps[0].sender_mac) == mac
    assert f"lladdr {mac}" in seg.gw_neigh(POD4)


def test_garp_creates_entry_with_arp_accept(seg: Segment) -> None:
    sh("sysctl", "-qw", "net.ipv4.conf.rtDgw0.arp_accept=1", netns=seg.gw)  # gateway ns only
    seg.in_pod(announce, "rtDpod0", [POD4])
    assert f"lladdr {seg.pod_mac}" in seg.gw_neigh(POD4)


def test_unsolicited_na_replaces_stale_entry(seg: Segment) -> None:
    sh("ip", "-n", seg.gw, "neigh", "replace", POD6, "lladdr", "02:00:00:00:00:99", "dev",
       "rtDgw0", "nud", "stale")
    mac = _rewrite_pod_mac(seg)
    cap = Capture(seg)
    seg.in_pod(announce, "rtDpod0", [f"{POD6}/64"])
    nas = [p for p in cap.nds() if p.type == pk.ND_NA and str(p.target) == POD6]
    assert len(nas) == 1 and str(nas[0].dst) == "ff02::1"
    assert nas[0].flags == pk.NA_OVERRIDE and pk.mac_to_str(nas[0].lladdr) == mac
    assert f"lladdr {mac}" in seg.gw_neigh(POD6)


def test_unsolicited_na_creates_entry_with_accept_untracked_na(seg: Segment) -> None:
    # The kernel creates entries from untracked NAs only on a router (forwarding) with this set.
    for key in ("forwarding", "accept_untracked_na"):
        sh("sysctl", "-qw", f"net.ipv6.conf.rtDgw0.{key}=1", netns=seg.gw)  # gateway ns only
    seg.in_pod(announce, "rtDpod0", [POD6])
    assert f"lladdr {seg.pod_mac}" in seg.gw_neigh(POD6)


def test_unsolicited_na_waits_for_dad_of_a_tentative_address(seg: Segment) -> None:
    """A fresh address (kernel DAD running) is announced once DAD is over, never while
    tentative: the gateway's stale entry then holds the pod's MAC."""
    fresh = "fd77::20"
    sh("ip", "-n", seg.gw, "neigh", "replace", fresh, "lladdr", "02:00:00:00:00:99", "dev",
       "rtDgw0", "nud", "stale")
    cap = Capture(seg)
    sh("ip", "-n", seg.pod, "addr", "add", f"{fresh}/64", "dev", "rtDpod0")  # with DAD
    try:
        assert "tentative" in sh("ip", "-n", seg.pod, "addr", "show", "dev", "rtDpod0")
        elapsed, exc = seg.timed_in_pod(announce, "rtDpod0", [f"{fresh}/64"])
        assert exc is None
        assert "tentative" not in sh("ip", "-n", seg.pod, "addr", "show", "dev", "rtDpod0")
        nas = [p for p in cap.nds() if p.type == pk.ND_NA and str(p.target) == fresh]
        assert len(nas) == 1 and pk.mac_to_str(nas[0].lladdr) == seg.pod_mac
        assert f"lladdr {seg.pod_mac}" in seg.gw_neigh(fresh)
        assert 0.1 < elapsed < 3.0 + SLACK, elapsed  # waited for DAD, within its bound
    finally:
        sh("ip", "-n", seg.pod, "addr", "del", f"{fresh}/64", "dev", "rtDpod0", check=False)


def test_still_tentative_address_is_skipped_with_a_log_line(seg: Segment, caplog) -> None:
    """No carrier: DAD never finishes. The NA is skipped after the DAD bound and says so; the
    IPv4 address on the same link is still announced."""
    sh("ip", "-n", seg.pod, "link", "add", "rtDnc0", "type", "veth", "peer", "name", "rtDnc1")
    try:
        sh("ip", "-n", seg.pod, "link", "set", "rtDnc0", "up")  # rtDnc1 stays down
        sh("ip", "-n", seg.pod, "addr", "add", "fd78::5/64", "dev", "rtDnc0")
        sh("ip", "-n", seg.pod, "addr", "add", "10.78.0.5/24", "dev", "rtDnc0")
        with caplog.at_level("DEBUG", logger="cniplugin.kernel.probe"):
            elapsed, exc = seg.timed_in_pod(announce, "rtDnc0", ["fd78::5/64", "10.78.0.5/24"])
        assert exc is None
        skipped = [r.getMessage() for r in caplog.records if "no unsolicited NA" in r.getMessage()]
        assert len(skipped) == 1 and "fd78::5 on rtDnc0" in skipped[0], skipped
        assert "still tentative" in skipped[0]
        assert any("announced 10.78.0.5 on rtDnc0" in r.getMessage() for r in caplog.records)
        assert 2.5 < elapsed < 3.0 + SLACK, elapsed  # router_solicitation_delay + 1 x 1 s + 1 s
    finally:
        sh("ip", "-n", seg.pod, "link", "del", "rtDnc0", check=False)


def test_announce_never_raises(seg: Segment) -> None:
    seg.in_pod(announce, "rtDnothere", [POD4, POD6])
    seg.in_pod(announce, "rtDpod0", ["not-an-address"])


def test_missing_interface(seg: Segment) -> None:
    _, exc = seg.timed_in_pod(check_gateways, "rtDnothere", [(POD4, GW4)], DEFAULTS)
    assert isinstance(exc, InterfaceNotFound) and exc.code == 102


def test_link_down_is_reported_not_crashed(seg: Segment) -> None:
    """Run in the squatter (an expendable interface): probes on a down link cannot be sent."""
    sh("ip", "-n", seg.sq, "link", "set", "rtDsq0", "down")
    try:
        _, exc = in_netns(seg.sq, lambda: _timed(check_gateways, "rtDsq0", [(POD4, GW4)], DEFAULTS))
        assert isinstance(exc, GatewayUnreachable) and "sending failed" in str(exc)
        _, exc = in_netns(seg.sq, lambda: _timed(check_conflicts, "rtDsq0", [POD4], DEFAULTS))
        assert isinstance(exc, TryAgainLater) and exc.code == 11
    finally:
        sh("ip", "-n", seg.sq, "link", "set", "rtDsq0", "up")
