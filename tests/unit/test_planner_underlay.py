"""Pure planner tests for underlay and auto modes: hand-built facts, no root."""

from __future__ import annotations

import pytest

from cniplugin.protocol.errors import InvalidConfig, UnderlayNotReady
from cniplugin.records.facts import Addr, Facts, Link, NodeFacts, PodFacts
from cniplugin.records.objects import MAIN_TABLE, Desired, Route, Veth
from cniplugin.engine.attachment import Attachment
from cniplugin.engine.mode import resolve_mode
from cniplugin.engine.planner import node_veth_name, planned_mac
from harness.plans import assert_plan, config, plan

CID = "0123456789abcdef" * 4


def underlay_facts(veth: bool = False, v6: bool = False) -> Facts:
    links = [Link(1, "lo"), Link(2, "eth0", "macvlan", "aa:00:00:00:00:01"),
             Link(3, "net1", "macvlan", "aa:00:00:00:01:01")]
    addrs = [Addr("eth0", 4, "10.6.0.50", 24), Addr("net1", 4, "172.16.11.10", 24)]
    main = [Route(4, MAIN_TABLE, "10.6.0.0/24", "eth0", scope="link", src="10.6.0.50", proto=2),
            Route(4, MAIN_TABLE, "0.0.0.0/0", "eth0", gateway="10.6.0.1", proto=3),
            Route(4, MAIN_TABLE, "172.16.11.0/24", "net1", scope="link", src="172.16.11.10",
                  proto=2)]
    if v6:
        addrs.append(Addr("eth0", 6, "fd00:6::50", 64))
        main.append(Route(6, MAIN_TABLE, "::/0", "eth0", gateway="fd00:6::1", metric=1024,
                          proto=3))
    peer = None
    if veth:
        links.append(Link(9, "veth0", "veth", "02:00:00:00:00:09", peer_index=7))
        peer = Link(7, node_veth_name(CID), "veth", "02:00:00:00:00:07", peer_index=9)
    node = NodeFacts(peer, node_ips=("10.6.0.4", "fd00:6::4"),
                     local_addrs=frozenset({"10.6.0.4", "fd00:6::4"}),
                     gateways=frozenset({"10.6.0.1"}))
    return Facts(PodFacts(links=tuple(links), addrs=tuple(addrs), main_routes=tuple(main),
                          used_tables=frozenset({254, 255})), node)


def eth0(v6: bool = False) -> Attachment:
    addrs = ("10.6.0.50/24",) + (("fd00:6::50/64",) if v6 else ())
    gws = ("10.6.0.1",) + (("fd00:6::1",) if v6 else ())
    return Attachment(CID, "eth0", "underlay", addrs, gws)


def net1() -> Attachment:
    return Attachment(CID, "net1", "rail", ("172.16.11.10/24",), ("172.16.11.254",))


@pytest.mark.parametrize("mode,ifname,links,want", [
    ("auto", "eth0", ["lo", "eth0"], "underlay"),
    ("auto", "net1", ["lo", "eth0", "veth0", "net1"], "underlay"),
    ("auto", "net1", ["lo", "eth0", "net1"], "overlay"),
    ("underlay", "eth0", ["lo", "eth0"], "underlay"),
    ("underlay", "net1", ["lo", "eth0", "veth0", "net1"], "underlay"),
    ("overlay", "net1", ["lo", "eth0", "net1"], "overlay"),
    ("disable", "eth0", ["lo"], "disabled"),
])
def test_resolve_mode(mode, ifname, links, want):
    assert resolve_mode(config(mode=mode), ifname, links) == want


def test_resolve_mode_errors_name_the_missing_step():
    with pytest.raises(UnderlayNotReady) as err:
        resolve_mode(config(mode="underlay"), "net1", ["lo", "eth0", "net1"])
    assert err.value.code == 105 and "must run on eth0" in err.value.msg \
        and "veth0" in err.value.msg
    with pytest.raises(InvalidConfig, match="veth0"):
        resolve_mode(config(mode="overlay"), "net1", ["lo", "eth0", "veth0", "net1"])
    with pytest.raises(InvalidConfig, match="podDefaultCniNic"):
        resolve_mode(config(mode="overlay"), "eth0", ["lo", "eth0"])


def test_first_invocation_plans_the_veth_pair_steering_and_tables():
    """eth0 (the first invocation) owns the veth pair, its nft table, table 100, the main-table
    cluster routes and table 101; nothing is displaced."""
    desired = plan(config(), eth0(), underlay_facts())
    peer = node_veth_name(CID)
    assert len(peer) <= 15 and peer == "rt0123456789a"
    veth = next(o for o in desired.pod_owned if isinstance(o, Veth))
    assert (veth.mac, veth.peer_mac) == (planned_mac(CID, "pod"), planned_mac(CID, "node"))
    assert int(veth.mac[:2], 16) & 0x3 == 0x2  # locally administered unicast
    assert_plan(desired, "underlay_first")


def test_readd_uses_live_macs_and_is_deterministic():
    """#2464: with the pair present the neighbours name the live MACs, not the planned ones."""
    assert_plan(plan(config(), eth0(), underlay_facts(veth=True)), "underlay_readd")
    assert plan(config(), eth0(), underlay_facts()) == plan(config(), eth0(), underlay_facts())


def test_later_invocation_gets_its_own_table_via_veth0():
    """net1 never lists eth0's objects (veth pair, nft table, main and table 100)."""
    facts = underlay_facts(veth=True)
    facts = Facts(PodFacts(**{**facts.pod.__dict__, "used_tables": frozenset({100, 101, 254})}),
                  facts.node)
    assert_plan(plan(config(), net1(), facts), "underlay_later")


def test_underlay_options_and_policy_routes():
    """Policy routes go into main (unsourced traffic) and 101 (eth0-sourced traffic); an
    IPv6-only pod never gets vethLinkAddress (it is IPv4)."""
    conf = config(policyRoutes=[{"dst": "192.0.2.0/24", "gw": "10.6.0.1"}], txQueueLen=2000,
                  vethLinkAddress="169.254.100.1", vethMTU=1400)
    assert_plan(plan(conf, eth0(), underlay_facts()), "underlay_options")
    v6 = Attachment(CID, "eth0", "underlay", ("fd00:6::50/64",), ("fd00:6::1",))
    facts = underlay_facts(v6=True)
    facts = Facts(PodFacts(**{**facts.pod.__dict__, "addrs": tuple(
        a for a in facts.pod.addrs if a.family == 6)}), facts.node)
    assert_plan(plan(conf, v6, facts), "underlay_options_v6_only")


def test_dual_stack_first_invocation():
    assert_plan(plan(config(), eth0(v6=True), underlay_facts(v6=True)), "underlay_dual")


def test_state_round_trip_keeps_underlay_objects():
    desired = plan(config(), eth0(v6=True), underlay_facts(v6=True))
    again = Desired.from_dict(desired.to_dict())
    assert again == desired and again.mode == "underlay"


def test_rail_tables_route_the_underlay_subnet_through_eth0():
    """A rail-bound source reaches another pod's eth0 through eth0: every later table holds
    copies of eth0's connected subnets (IPv6 without src), but neither eth0's routes via a
    gateway (they could cover the rail fabric), nor its link-local or default routes, nor the
    routes route-tune itself put in main."""
    facts = underlay_facts(veth=True, v6=True)
    extra = (Route(6, MAIN_TABLE, "fd00:6::/64", "eth0", metric=256, proto=2),
             Route(6, MAIN_TABLE, "fe80::/64", "eth0", metric=256, proto=2),
             Route(4, MAIN_TABLE, "10.7.0.0/16", "eth0", gateway="10.6.0.1", proto=4),
             Route(4, MAIN_TABLE, "192.0.2.0/24", "eth0", scope="link", proto=231))
    facts = Facts(PodFacts(**{**facts.pod.__dict__, "main_routes": facts.pod.main_routes + extra,
                              "addrs": facts.pod.addrs + (Addr("net1", 6, "fd00:16:11::10", 64),),
                              "used_tables": frozenset({100, 101, 254})}), facts.node)
    rail = Attachment(CID, "net1", "rail", ("172.16.11.10/24", "fd00:16:11::10/64"),
                      ("172.16.11.254", "fd00:16:11::254"))
    desired = plan(config(), rail, facts)
    via_eth0 = {(r.family, r.dst, r.src, r.gateway, r.metric) for r in desired.pod_owned
                if isinstance(r, Route) and r.table == 102 and r.dev == "eth0"}
    assert via_eth0 == {(4, "10.6.0.0/24", "10.6.0.50", "", 0), (6, "fd00:6::/64", "", "", 256)}
