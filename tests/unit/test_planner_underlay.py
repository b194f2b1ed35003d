"""Pure planner tests for underlay and auto modes: hand-built facts, no root."""

from __future__ import annotations

import pytest

from cniplugin.protocol.errors import InvalidConfig, UnderlayNotReady
from cniplugin.engine.facts import Addr, Facts, Link, NodeFacts, PodFacts
from cniplugin.engine.objects import MAIN_TABLE, Desired, Neighbour, NftTable, Route, Rule, Veth
from cniplugin.engine.planner import (Attachment, node_veth_name, plan, planned_mac, resolve_mode)
from test_planner import Config, Policy

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
    ("underlay", "net1", None, "underlay"),      # links unknown (CLI): no veth0 check
])
def test_resolve_mode(mode, ifname, links, want):
    assert resolve_mode(Config(mode=mode), ifname, links) == want


def test_resolve_mode_errors_name_the_missing_step():
    with pytest.raises(UnderlayNotReady) as err:
        resolve_mode(Config(mode="underlay"), "net1", ["lo", "eth0", "net1"])
    assert err.value.code == 105 and "must run on eth0" in err.value.msg \
        and "veth0" in err.value.msg
    with pytest.raises(InvalidConfig, match="veth0"):
        resolve_mode(Config(mode="overlay"), "net1", ["lo", "eth0", "veth0", "net1"])
    with pytest.raises(InvalidConfig, match="podDefaultCniNic"):
        resolve_mode(Config(mode="overlay"), "eth0", ["lo", "eth0"])


def test_first_invocation_plans_the_veth_pair_steering_and_tables():
    desired = plan(Config(), eth0(), underlay_facts())
    lines = desired.render_lines()
    peer = node_veth_name(CID)
    assert desired.mode == "underlay" and desired.table == 101 and desired.host_peer == peer
    assert len(peer) <= 15 and peer == "rt0123456789a"
    veth = next(o for o in desired.pod_owned if isinstance(o, Veth))
    assert veth == Veth("veth0", peer, 1500, planned_mac(CID, "pod"), planned_mac(CID, "node"),
                        "", f"route-tune:{CID}")
    assert int(veth.mac[:2], 16) & 0x3 == 0x2  # locally administered unicast
    assert NftTable("veth0", 1, 1) in desired.pod_owned
    assert "ip rule add from all fwmark 0x1/0x1 lookup 100 pref 30000 proto 231" in lines
    assert "ip rule add from 10.6.0.50/32 lookup 101 pref 31000 proto 231" in lines
    assert ("ip route replace default via 10.6.0.4 dev veth0 src 10.6.0.50 table 100 "
            "proto 231") in lines
    assert ("ip route replace 10.233.0.0/18 via 10.6.0.4 dev veth0 src 10.6.0.50 table main "
            "proto 231") in lines
    assert "ip route replace 10.6.0.4 dev veth0 scope link src 10.6.0.50 table main proto 231" \
        in lines
    assert "ip route replace default via 10.6.0.1 dev eth0 table 101 proto 231" in lines
    assert Neighbour(4, "veth0", "10.6.0.4", planned_mac(CID, "node")) in desired.pod_owned
    assert Neighbour(4, peer, "10.6.0.50", planned_mac(CID, "pod")) in desired.node_owned
    assert Route(4, 500, "10.6.0.50/32", peer, scope="link") in desired.node_owned
    # eth0 keeps its main default; nothing is shared: everything belongs to eth0's attachment.
    assert not desired.displaced
    assert all(o.key()[0] == "sysctl" for o in desired.pod_shared)


def test_readd_uses_live_macs_and_is_deterministic():
    """#2464: with the pair present the neighbours name the live MACs, not the planned ones."""
    desired = plan(Config(), eth0(), underlay_facts(veth=True))
    assert Neighbour(4, "veth0", "10.6.0.4", "02:00:00:00:00:07") in desired.pod_owned
    assert Neighbour(4, node_veth_name(CID), "10.6.0.50", "02:00:00:00:00:09") \
        in desired.node_owned
    assert plan(Config(), eth0(), underlay_facts()) == plan(Config(), eth0(), underlay_facts())


def test_later_invocation_gets_its_own_table_via_veth0():
    first = plan(Config(), eth0(), underlay_facts())
    facts = underlay_facts(veth=True)
    facts = Facts(PodFacts(**{**facts.pod.__dict__, "used_tables": frozenset({100, 101, 254})}),
                  facts.node)
    desired = plan(Config(), net1(), facts)
    lines = desired.render_lines()
    assert desired.mode == "underlay" and desired.table == 102
    assert "ip rule add from 172.16.11.10/32 lookup 102 pref 31000 proto 231" in lines
    assert ("ip route replace 10.233.0.0/18 via 10.6.0.4 dev veth0 src 10.6.0.50 table 102 "
            "proto 231") in lines
    assert not any(isinstance(o, (Veth, NftTable)) for o in desired.pod_objects())
    assert not any(isinstance(o, Route) and o.table in (MAIN_TABLE, 100)
                   for o in desired.pod_objects()), "main and table 100 belong to eth0"
    assert Neighbour(4, "rt0123456789a", "172.16.11.10", "02:00:00:00:00:09") \
        in desired.node_owned
    shared_keys = {o.key() for o in desired.pod_objects()} & {o.key() for o in first.pod_owned}
    assert all(k[0] == "sysctl" for k in shared_keys), "net1 never lists eth0's objects"


def test_underlay_options_and_policy_routes():
    config = Config(policy_routes=[Policy("192.0.2.0/24", "10.6.0.1")], tx_queue_len=2000)
    config.veth_link_address, config.veth_mtu = "169.254.100.1", 1400
    desired = plan(config, eth0(), underlay_facts())
    veth = next(o for o in desired.pod_owned if isinstance(o, Veth))
    assert veth.mtu == 1400 and veth.address == "169.254.100.1/32"
    lines = desired.render_lines()
    assert "ip link set dev eth0 txqueuelen 2000" in lines
    for table in ("main", "101"):  # main: unsourced traffic; 101: eth0-sourced traffic
        assert f"ip route replace 192.0.2.0/24 via 10.6.0.1 dev eth0 table {table} proto 231" \
            in lines
    # IPv6-only pods never get vethLinkAddress (it is IPv4).
    v6 = Attachment(CID, "eth0", "underlay", ("fd00:6::50/64",), ("fd00:6::1",))
    facts = underlay_facts(v6=True)
    facts = Facts(PodFacts(**{**facts.pod.__dict__, "addrs": tuple(
        a for a in facts.pod.addrs if a.family == 6)}), facts.node)
    veth = next(o for o in plan(config, v6, facts).pod_owned if isinstance(o, Veth))
    assert veth.address == ""


def test_dual_stack_first_invocation():
    desired = plan(Config(), eth0(v6=True), underlay_facts(v6=True))
    lines = desired.render_lines()
    assert "ip -6 rule add from all fwmark 0x1/0x1 lookup 100 pref 30000 proto 231" in lines
    assert "ip -6 route replace default via fd00:6::4 dev veth0 metric 1024 table 100 proto 231" \
        in lines
    assert Neighbour(6, "veth0", "fd00:6::4", planned_mac(CID, "node")) in desired.pod_owned
    assert Rule(6, 30000, 100, fwmark=1, fwmask=1) in desired.pod_owned


def test_state_round_trip_keeps_underlay_objects():
    desired = plan(Config(), eth0(v6=True), underlay_facts(v6=True))
    again = Desired.from_dict(desired.to_dict())
    assert again == desired and again.mode == "underlay"
