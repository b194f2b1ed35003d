"""Rails that share one subnet, on a real kernel: ARP/NDP answers, routing and announcements.

Two layouts (``harness.topologies.Fabric``, named by the harness and removed afterwards)::

    segments: each rail its own L2 segment, every segment the same subnet
        peer ns sK: seg 172.16.0.1/16 (gateway) + 172.16.0.200 (a subnet peer), lo 198.18.0.1
           | veth
        node ns: <tag>rK ── pod netK = macvlan on <tag>rK, 172.16.0.1K/16   (K = 1..N)

    flat: every rail on ONE segment and one subnet (the "all traffic leaves one NIC" report)
        peer ns s0: as above, one of it
           | veth
        node ns: <tag>r0 ── pod net1..net8 = macvlans on <tag>r0, 172.16.0.11 .. .18/16

IPv6 uses fd00:16::/64 the same way (gateway ::1, peer ::200, netK ::1K, remote
fd00:198:18::1). The node, the Calico-style pod eth0 and cluster CIDRs are as in
test_engine.py. route-tune runs as the installed executable in the node namespace.

Peers send raw ARP requests / neighbour solicitations (cniplugin.kernel.packets) for every rail
address on every segment and record who answers with which MAC (``harness.kernel``'s
``listen_answers``: until every owner the test expects answered, then a quiet window in which
nobody else may).
"""

from __future__ import annotations

import ipaddress
import json
import select
import socket
import struct
import sys

import pytest

from harness.host import in_netns, wait_until
from cniplugin.kernel import packets as pk
from cniplugin.lab.topology import PING_SCRIPT
from harness.kernel import PACKET_OUTGOING, Answers, listen_answers, nsx
from harness.kernel import arp_answers as _arp_answers
from harness.topologies import GW, REMOTE, SUBNET_PEER, Fabric
from harness.topologies import fabric_ip as rail_ip

pytestmark = pytest.mark.netns
SUBNET = {4: "172.16.0.0/16", 6: "fd00:16::/64"}
ETH_P_ALL = 0x0003


# -- who answers ---------------------------------------------------------------------------------
def arp_answers(ns: str, targets: list[str], expect: Answers) -> Answers:
    """From ``ns``'s seg, as the gateway: an ARP request for each target; who replies with what
    (listening until every ``expect``ed answer came, then for the quiet window)."""
    return _arp_answers(ns, "seg", GW[4], targets, expect)


def ns_answers(ns: str, targets: list[str], expect: Answers, all_nodes: bool = False) -> Answers:
    """From ``ns``'s seg, as the gateway: a neighbour solicitation for each target (to its
    solicited-node group, or to ff02::1 so that every interface receives it); who answers
    (listening until every ``expect``ed answer came, then for the quiet window)."""
    def body():
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(pk.ETH_P_IPV6)) as s:
            s.bind(("seg", pk.ETH_P_IPV6))
            mac = s.getsockname()[4]
            for target in targets:
                if all_nodes:
                    body = bytearray(struct.pack("!BBHI16s", pk.ND_NS, 0, 0, 0,
                                                 socket.inet_pton(socket.AF_INET6, target)))
                    body += struct.pack("!BB6s", 1, 1, mac)  # source link-layer address option
                    frame = pk._ipv6_frame(mac, pk.multicast_mac(pk.ALL_NODES),
                                           ipaddress.IPv6Address(GW[6]), pk.ALL_NODES, body)
                else:
                    frame = pk.build_ns(mac, GW[6], target)
                s.send(frame)

            def parse(frame):
                p = pk.parse_nd(frame)
                if p and p.type == pk.ND_NA and str(p.target) in targets:
                    return str(p.target), pk.mac_to_str(p.lladdr or p.eth_src)
                return None
            return listen_answers(s, parse, expect)
    return in_netns(ns, body)


def pod_sysctls(fab: Fabric) -> dict[str, str]:
    text = nsx(fab.pod, "sh", "-c", "grep -r . /proc/sys/net/ipv4/conf/*/arp_ignore "
               "/proc/sys/net/ipv4/conf/*/arp_announce /proc/sys/net/ipv4/conf/*/rp_filter")
    return dict(line.removeprefix("/proc/sys/net/ipv4/conf/").split(":", 1)
                for line in text.splitlines())


def add_all(fab: Fabric, prevs: dict[int, dict], **keys) -> None:
    for k in range(1, fab.rails + 1):
        fab.ok("ADD", k, prevs[k], **keys)


def del_all(fab: Fabric, prevs: dict[int, dict]) -> None:
    for k in reversed(range(1, fab.rails + 1)):
        fab.ok("DEL", k, prevs[k])


# -- separate segments, one subnet ---------------------------------------------------------------
def test_segments_ipv4_each_rail_answers_only_for_itself(fabric):
    """Before ADD the kernel answers ARP for any pod address on any rail (ARP flux); ADD sets
    arp_ignore=1/arp_announce=2 on every netK (only there), CHECK verifies them, the last DEL
    restores the originals; with podARPIsolation false nothing is touched and the flux stays."""
    fab = fabric("segments", 4, (4,))
    rails = range(1, fab.rails + 1)
    prevs = {k: fab.attach(k) for k in rails}
    macs = {k: fab.mac(k) for k in rails}
    addrs = [rail_ip(k, 4) for k in rails]
    flux = {k: {a: {macs[k]} for a in addrs} for k in rails}  # netK claims its siblings too
    own = {k: {rail_ip(k, 4): {macs[k]}} for k in rails}
    assert {k: arp_answers(fab.peer(k), addrs, flux[k]) for k in rails} == flux
    before = pod_sysctls(fab)
    assert {before[f"{d}/arp_ignore"] for d in ("all", "eth0", "net1")} == {"0"}

    add_all(fab, prevs)
    after = pod_sysctls(fab)
    want = dict(before)
    for k in rails:
        want[f"net{k}/arp_ignore"], want[f"net{k}/arp_announce"] = "1", "2"
    assert after == want, "netK only: `all` and eth0 keep their values"
    for k in rails:
        fab.ok("CHECK", k, prevs[k])
    assert {k: arp_answers(fab.peer(k), addrs, own[k]) for k in rails} == own

    del_all(fab, prevs)
    assert pod_sysctls(fab) == before
    assert {k: arp_answers(fab.peer(k), addrs, flux[k]) for k in rails} == flux

    add_all(fab, prevs, podARPIsolation=False)
    assert pod_sysctls(fab) == before
    assert {k: arp_answers(fab.peer(k), addrs, flux[k]) for k in rails} == flux
    del_all(fab, prevs)


def test_segments_ipv6_neighbour_solicitations_are_answered_per_interface(fabric):
    """IPv6 has no flux to fix: the kernel answers an NS only for the receiving interface's own
    addresses, even an NS every interface receives (to ff02::1). Same before and after ADD."""
    fab = fabric("segments", 4, (6,))
    rails = range(1, fab.rails + 1)
    prevs = {k: fab.attach(k) for k in rails}
    addrs = [rail_ip(k, 6) for k in rails]
    own = {k: {rail_ip(k, 6): {fab.mac(k)}} for k in rails}
    for phase in ("before ADD", "after ADD"):
        for all_nodes in (False, True):
            got = {k: ns_answers(fab.peer(k), addrs, own[k], all_nodes) for k in rails}
            assert got == own, (phase, all_nodes)
        if phase == "before ADD":
            add_all(fab, prevs)
    del_all(fab, prevs)


# -- one flat segment, one subnet, eight rails ---------------------------------------------------
class PodCapture:
    """One packet socket per rail in the pod: where echo requests to, and replies from, each
    rail address really arrive and leave."""

    def __init__(self, fab: Fabric) -> None:
        def open_all():
            out = {}
            for k in range(1, fab.rails + 1):
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                s.bind((f"net{k}", ETH_P_ALL))
                out[f"net{k}"] = s
            return out
        self.socks = in_netns(fab.pod, open_all)

    def seen(self) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
        """(address -> rails an echo request to it arrived on,
            address -> rails an echo reply from it left through)."""
        requests: dict[str, set[str]] = {}
        replies: dict[str, set[str]] = {}
        for name, s in self.socks.items():
            with s:
                while select.select([s], [], [], 0.05)[0]:
                    frame, addr = s.recvfrom(65535)
                    hit = _echo(frame)
                    if hit is None:
                        continue
                    kind, src, dst = hit
                    if kind == "request" and addr[2] != PACKET_OUTGOING:
                        requests.setdefault(dst, set()).add(name)
                    elif kind == "reply" and addr[2] == PACKET_OUTGOING:
                        replies.setdefault(src, set()).add(name)
        return requests, replies


def _echo(frame: bytes):
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == 0x0800 and frame[23] == 1:
        start = 14 + (frame[14] & 0x0F) * 4
        kind = {8: "request", 0: "reply"}.get(frame[start])
        return kind and (kind, socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34]))
    if ethertype == 0x86DD and frame[20] == 58:
        kind = {128: "request", 129: "reply"}.get(frame[54])
        return kind and (kind, socket.inet_ntop(socket.AF_INET6, frame[22:38]),
                         socket.inet_ntop(socket.AF_INET6, frame[38:54]))
    return None


def pings(ns: str, pairs: list[tuple[str, str]]) -> list[dict]:
    """One echo per (src, dst) from ``ns`` ("" = the kernel's source); the failed ones."""
    done = nsx(ns, sys.executable, "-I", "-S", str(PING_SCRIPT), "--timeout", "2",
               *[f"{s}>{d}" for s, d in pairs])
    return [p for p in json.loads(done) if not p["ok"]]


def route_get(fab: Fabric, dst: str, src: str = "") -> dict:
    args = ["ip", "-j", "route", "get", dst] + (["from", src] if src else [])
    return json.loads(nsx(fab.pod, *args))[0]


def test_flat_segment_eight_rails_one_subnet(fabric):
    """All rails on one segment and subnet: every address is claimed by its own rail alone
    (ARP and NDP), a peer's packets to each address arrive on that rail and the replies leave
    through it, each rail's source routes via itself, cluster and unsourced traffic stays on
    eth0, and the node reaches every rail address."""
    fab = fabric("flat", 8, (4, 6))
    rails = range(1, fab.rails + 1)
    prevs = {k: fab.attach(k) for k in rails}
    add_all(fab, prevs)
    macs = {k: fab.mac(k) for k in rails}
    assert len(set(macs.values())) == 8
    peer = fab.peer(1)
    for fam, ask in ((4, arp_answers), (6, ns_answers)):
        addrs = [rail_ip(k, fam) for k in rails]
        own = {rail_ip(k, fam): {macs[k]} for k in rails}
        assert ask(peer, addrs, own) == own, fam
    own6 = {rail_ip(k, 6): {macs[k]} for k in rails}
    assert ns_answers(peer, list(own6), own6, all_nodes=True) == own6

    rules = json.loads(nsx(fab.pod, "ip", "-j", "rule", "show")) + json.loads(
        nsx(fab.pod, "ip", "-j", "-6", "rule", "show"))
    tables = {r["src"]: str(r["table"]) for r in rules if r.get("priority") == 31000}
    problems = []
    for fam in (4, 6):
        for k in rails:
            src, dev = rail_ip(k, fam), f"net{k}"
            subnet = json.loads(nsx(fab.pod, "ip", "-j", f"-{fam}", "route", "show", "table",
                                    tables[src], SUBNET[fam]))
            if [r["dev"] for r in subnet] != [dev]:
                problems.append(f"table {tables[src]} {SUBNET[fam]}: want dev {dev}, got {subnet}")
            for dst, gateway in ((GW[fam], None), (SUBNET_PEER[fam], None),
                                 (REMOTE[fam], GW[fam])):
                got = route_get(fab, dst, src)
                if (got.get("dev"), got.get("gateway")) != (dev, gateway):
                    problems.append(f"{src} -> {dst}: want {dev} via {gateway}, got {got}")
            cluster = "10.233.0.10" if fam == 4 else "fd00:96::a"
            if route_get(fab, cluster, src).get("dev") != "eth0":
                problems.append(f"{src} -> cluster {cluster}: want eth0")
        if route_get(fab, REMOTE[fam]).get("dev") != "eth0":
            problems.append(f"unsourced -> {REMOTE[fam]}: want eth0")
    assert not problems, "\n".join(problems)

    nsx(peer, "ip", "neigh", "flush", "all")
    capture = PodCapture(fab)
    assert pings(peer, [("", rail_ip(k, fam)) for fam in (4, 6) for k in rails]) == []
    requests, replies = capture.seen()
    want = {rail_ip(k, fam): {f"net{k}"} for fam in (4, 6) for k in rails}
    assert (requests, replies) == (want, want)
    for fam in (4, 6):
        neigh = {n["dst"]: n.get("lladdr") for n in json.loads(
            nsx(peer, "ip", "-j", f"-{fam}", "neigh", "show", "dev", "seg"))}
        assert {rail_ip(k, fam): neigh.get(rail_ip(k, fam)) for k in rails} == {
            rail_ip(k, fam): macs[k] for k in rails}
    assert pings(fab.pod, [(rail_ip(k, fam), dst) for fam in (4, 6) for k in rails
                           for dst in (GW[fam], REMOTE[fam])]) == []
    assert pings(fab.node, [("", rail_ip(k, fam)) for fam in (4, 6) for k in rails]) == []
    del_all(fab, prevs)


# -- announcements after ADD ---------------------------------------------------------------------
@pytest.mark.parametrize("dad", [False, True], ids=["address-settled", "address-tentative"])
def test_add_announces_so_a_stale_gateway_learns_the_new_mac(fabric, dad):
    """Issue 4/12: with detection off, the gateway's STALE entry of another MAC for a reused
    address is replaced with net1's MAC after ADD, without any traffic of its own: GARP (IPv4)
    and unsolicited NA (IPv6), the NA sent once the address left DAD."""
    fab = fabric("segments", 1, (4, 6))
    gw = fab.peer(1)
    for fam in (4, 6):
        nsx(gw, "ip", "neigh", "replace", rail_ip(1, fam), "lladdr", "02:00:00:00:00:99", "dev",
            "seg", "nud", "stale")
    prev = fab.attach(1, dad=dad)
    assert ("tentative" in nsx(fab.pod, "ip", "-6", "addr", "show", "dev", "net1", "scope",
                               "global")) == dad

    def gateway_macs() -> dict[int, str]:
        return {fam: json.loads(nsx(gw, "ip", "-j", f"-{fam}", "neigh", "show", rail_ip(1, fam),
                                    "dev", "seg"))[0].get("lladdr") for fam in (4, 6)}
    assert gateway_macs() == {4: "02:00:00:00:00:99", 6: "02:00:00:00:00:99"}
    fab.ok("ADD", 1, prev)
    seen: list[dict[int, str]] = []

    def learned() -> bool:
        seen[:] = [gateway_macs()]
        return seen[0] == {4: fab.mac(1), 6: fab.mac(1)}
    try:
        wait_until(learned, what="the gateway to learn net1's MAC")
    except AssertionError as err:
        raise AssertionError(f"{err} (it has {seen[0]}, net1's is {fab.mac(1)})") from None
    fab.ok("DEL", 1, prev)
