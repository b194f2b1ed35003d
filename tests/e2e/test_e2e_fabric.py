"""Two nodes, eight rails: pod A (node 1) and pod B (node 2) across the rail-optimised fabric,
both set up through libcni with ``[macvlan + host-local, route-tune]`` per rail.

Every flow is counted per interface on both ends by its own packets (``cniplugin.lab.flows``:
nftables counters keyed by interface and ports), so ARP, NDP and announcements never blur it.
Cases: overlay/underlay x separate subnets/one shared subnet x IPv4/dual stack
(``harness.fabric.CASES``); docs/lab.md draws the lab, docs/routing.md the expected paths.
"""

from __future__ import annotations

import json

import pytest

from cniplugin.lab.flows import Flow, run_flows, send_datagrams
from cniplugin.lab.topology import state_diff
from harness.kernel import arp_answers
from harness.fabric import assert_rail_del_exact
from harness.snapshot import rules_sorted

pytestmark = [pytest.mark.netns, pytest.mark.libcni]


def _paths_text(paths) -> str:
    return "\n".join(f"{p.flow.src or '(unbound)'} -> {p.flow.dst}: ok={p.ok} {p.error} local={p.local} "
                     f"A out {p.client_out} B in {p.server_in} B out {p.server_out} A in {p.client_in}"
                     for p in paths)


def test_every_rail_carries_its_own_stream_both_ways(fabric_rig):
    """A netK -> B netK for K = 1..8 (every family) at the same time, a 2 MiB echo each: every
    stream left and arrived on netK in both pods, replies included, and on no other interface."""
    fabric_rig.assert_streams_on_own_rails()


def test_different_rails_bound_and_unbound(fabric_rig):
    """A net1 -> B net2. Bound to net1's address: out by A net1, through leaf 1, the spine and
    leaf 2, into B net2; B's reply leaves by net2 and comes back on A's net1, although A has an
    address in B net2's subnet. Unbound: the kernel's choice docs/routing.md documents (separate
    subnets: A net2 with its own source, switched on leaf 2; one shared subnet: main's first
    rail, net1, routed), and the reply takes the same interfaces back."""
    lab = fabric_rig.lab
    leaves = (lab.leaf(1), lab.spine, lab.leaf(2))
    for fam in lab.families:
        bound, unbound = fabric_rig.rail_flow(1, fam, 2), fabric_rig.rail_flow(1, fam, 2, bound=False)
        paths = run_flows([bound, unbound], transit=leaves)
        assert paths[0].ok and paths[0].only("net1", "net2"), _paths_text(paths)
        assert paths[0].local == lab.rail_ip(1, 1, fam)
        hops = {ns: paths[0].transit[ns] for ns in leaves}
        assert hops == {lab.leaf(1): {"request": ({"seg"}, {"tospine"}), "reply": ({"tospine"}, {"seg"})},
                        lab.spine: {"request": ({"leaf1"}, {"leaf2"}), "reply": ({"leaf2"}, {"leaf1"})},
                        lab.leaf(2): {"request": ({"tospine"}, {"seg"}), "reply": ({"seg"}, {"tospine"})}}, hops
        chosen = 1 if lab.layout == "shared" else 2
        assert paths[1].ok and paths[1].only(f"net{chosen}", "net2"), _paths_text(paths)
        assert paths[1].local == lab.rail_ip(1, chosen, fam), _paths_text(paths)
        got = lab.route_get(fabric_rig.a, lab.rail_ip(2, 2, fam))
        assert (got["dev"], got["prefsrc"]) == (f"net{chosen}", lab.rail_ip(1, chosen, fam)), got


def test_cluster_traffic_from_every_rail_source_stays_off_the_rails(fabric_rig):
    """From every rail's address: the service range (answered by node A) goes out and comes back
    on the cluster interface. B's eth0: out by A's eth0 (underlay too: eth0's subnet is in every
    rail table), into B's eth0, and B's answer leaves by its eth0; node 2: out by the cluster
    interface, in by its uplink, and its answer leaves there. Those answers go to a rail address,
    which the cluster network does not route back (as Calico), so they are counted where they
    leave, not where they would arrive (docs/routing.md, "Two nodes")."""
    lab, dev = fabric_rig.lab, fabric_rig.cluster_dev()
    service = [Flow(fabric_rig.a, lab.node(1), lab.rail_ip(1, k, fam), lab.service_ip(fam), fabric_rig.port())
               for fam in lab.families for k in lab.rail_ids]
    paths = run_flows(service, size=64 << 10)
    bad = [p for p in paths if not p.ok or (set(p.client_out), set(p.client_in)) != ({dev}, {dev})]
    assert not bad, _paths_text(bad)
    one_way, want = [], []
    for fam in lab.families:
        for k in lab.rail_ids:
            src = lab.rail_ip(1, k, fam)
            one_way += [Flow(fabric_rig.a, fabric_rig.b, src, lab.pod_ip(2, fam), fabric_rig.port()),
                        Flow(fabric_rig.a, lab.node(2), src, lab.node_ip(2, fam), fabric_rig.port())]
            want += [("eth0", "eth0", "eth0"), (dev, "uplink", "uplink")]
    paths = send_datagrams(one_way, reflect=True)
    got = [(set(p.client_out), set(p.server_in), set(p.server_out)) for p in paths]
    bad = [p for p, g, w in zip(paths, got, want) if not p.ok or g != tuple({x} for x in w)]
    assert not bad, _paths_text(bad)


def test_no_arp_answer_crosses_rails(fabric_rig):
    """From every leaf's segment, an ARP request for every pod rail address of both nodes: only
    the rail that owns an address answers for it, with its own MAC, on either node (the shared
    subnet is where ARP flux would bite; the leaf's own proxy answers carry its MAC and are left
    out). Every case has IPv4."""
    lab = fabric_rig.lab
    macs = {}
    for i in lab.node_ids:
        for k in lab.rail_ids:
            link = lab.ip(lab.pod(i), "-j", "link", "show", f"net{k}")
            macs[lab.rail_ip(i, k, "4")] = (k, json.loads(link)[0]["address"])
    problems = []
    for k in lab.rail_ids:
        own = {target: {mac} for target, (owner, mac) in macs.items() if owner == k}
        answers = arp_answers(lab.leaf(k), "seg", lab.gw_ip(k, "4"), list(macs), expect=own)
        for target, (owner, mac) in macs.items():
            pod_macs = answers.get(target, set()) & {m for _, m in macs.values()}
            want = {mac} if owner == k else set()
            if pod_macs != want:
                problems.append(f"leaf {k}: {target} (net{owner}) answered by {pod_macs}, want {want}")
    assert not problems, "\n".join(problems)


def test_del_of_one_rail_leaves_the_peer_and_other_rails_then_readd_restores(fabric_rig):
    """DEL of A's net3: pod B and node 2 unchanged, node 1 loses exactly net3's entries (it is as
    before net3's ADD), A's other rails still carry their streams; re-ADD: the whole state (but
    net3's new MAC) and the matrix are back."""
    lab, k = fabric_rig.lab, 3
    pod_a = fabric_rig.pods[1]
    full = fabric_rig.states()
    pod_a.delete(k)
    after = fabric_rig.states()
    assert_rail_del_exact(lab, full, after, k)
    fabric_rig.assert_streams_on_own_rails(r for r in lab.rail_ids if r != k)

    pod_a.add(k)
    again = fabric_rig.states()
    for ns in full:
        assert state_diff(_recreated(full[ns], f"net{k}"), _recreated(again[ns], f"net{k}")) == "", ns
    fabric_rig.assert_streams_on_own_rails()


def test_del_of_everything_restores_both_nodes(fabric_rig):
    """Last: DEL every rail on both nodes: pods and nodes as before the rails' ADD; underlay then
    DELs eth0 too: both nodes as before anything."""
    fabric_rig.pods.delete_rails()
    now = fabric_rig.states()
    for ns, state in fabric_rig.before_add["rails"].items():
        assert state_diff(state, now[ns]) == "", ns
    fabric_rig.pods.teardown_eth0()
    for ns, state in fabric_rig.before_add["nodes"].items():
        assert state_diff(state, fabric_rig.states()[ns]) == "", ns


def _recreated(state: dict, ifname: str) -> dict:
    """A namespace state without what re-creating ``ifname`` (a macvlan) changes by itself: its
    MAC, the link-local address derived from it, and the place of its rule among rules of the
    same priority (the kernel lists those in insertion order)."""
    def own_ll(entry: dict) -> bool:
        return entry.get("dev") == ifname and str(entry.get("local", entry.get("dst", ""))).startswith("fe80:")
    links = [{k: v for k, v in link.items() if not (link.get("ifname") == ifname and k == "address")}
             for link in state["links"]]
    out = {**rules_sorted(state), "links": sorted(links, key=lambda link: json.dumps(link, sort_keys=True))}
    for key in ("addrs", "routes6"):
        out[key] = [e for e in state[key] if not own_ll(e)]
    return out
