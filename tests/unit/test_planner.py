"""Pure planner tests: hand-built facts, no root. Property tests state the routing invariants."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cniplugin.protocol.errors import InterfaceNotFound, InvalidConfig, UnderlayNotReady, UnsafeRequest
from cniplugin.records.facts import Addr, Facts, Link, NodeFacts, PodFacts
from cniplugin.records.objects import MAIN_TABLE, Desired, LinkAttr, Neighbour, Route, Rule, Sysctl
from cniplugin.engine.attachment import Attachment
from harness.plans import assert_plan, config, plan

HOST_TABLE = 500


def eth0_facts(nics: int, v6: bool = False, extra_tables=()) -> Facts:
    links = [Link(1, "lo"), Link(2, "eth0", "veth", "aa:00:00:00:00:01", peer_index=9)]
    addrs = [Addr("eth0", 4, "10.233.119.164", 32)]
    main = [Route(4, MAIN_TABLE, "169.254.1.1/32", "eth0", scope="link", proto=3),
            Route(4, MAIN_TABLE, "0.0.0.0/0", "eth0", gateway="169.254.1.1", proto=3)]
    if v6:
        addrs.append(Addr("eth0", 6, "fd00:233::164", 128))
        main.append(Route(6, MAIN_TABLE, "::/0", "eth0", gateway="fe80::1", metric=1024, proto=3))
    for k in range(1, nics + 1):
        links.append(Link(2 + k, f"net{k}", "macvlan", f"aa:00:00:00:01:0{k}"))
        addrs.append(Addr(f"net{k}", 4, f"172.16.1{k}.10", 24))
        main.append(Route(4, MAIN_TABLE, f"172.16.1{k}.0/24", f"net{k}", scope="link",
                          src=f"172.16.1{k}.10", proto=2))
        if v6:
            addrs.append(Addr(f"net{k}", 6, f"fd00:16:1{k}::10", 64))
    node = NodeFacts(Link(9, "cali1", "veth", "ee:ee:ee:ee:ee:ee", peer_index=2),
                     node_ips=("10.1.20.4", "fd00:1:20::4"),
                     local_addrs=frozenset({"10.1.20.4", "fd00:1:20::4"}),
                     gateways=frozenset({"10.1.20.1"}))
    return Facts(PodFacts(links=tuple(links), addrs=tuple(addrs), main_routes=tuple(main),
                          used_tables=frozenset({254, 255, *extra_tables})), node)


def attachment(k: int, v6: bool = False) -> Attachment:
    addrs = (f"172.16.1{k}.10/24",) + ((f"fd00:16:1{k}::10/64",) if v6 else ())
    gws = (f"172.16.1{k}.254",) + ((f"fd00:16:1{k}::254",) if v6 else ())
    return Attachment("c1", f"net{k}", "rail", addrs, gws)


def test_seed_plan_renders_coordinator_outcome_without_its_leak():
    """net1's table 101 carries the cluster CIDRs via eth0 (coordinator leaves them out)."""
    assert_plan(plan(config(), attachment(1), eth0_facts(1)), "overlay_seed")


def test_table_skips_used_tables_and_reuses_prior():
    facts = eth0_facts(2, extra_tables=(101, 102))
    assert plan(config(), attachment(2), facts).table == 103
    prior = plan(config(), attachment(2), eth0_facts(2))
    assert plan(config(), attachment(2), facts, prior).table == prior.table


def test_validation_errors():
    with pytest.raises(UnderlayNotReady, match="must run on eth0 .* first, in underlay mode"):
        plan(config(mode="underlay"), attachment(1), eth0_facts(1))
    with pytest.raises(InterfaceNotFound):
        plan(config(), attachment(3), eth0_facts(1))
    unsafe = Attachment("c1", "net1", "rail", ("10.1.20.4/24",), ())
    with pytest.raises(UnsafeRequest, match="node itself"):
        plan(config(), unsafe, eth0_facts(1))
    with pytest.raises(UnsafeRequest, match="gateway"):
        plan(config(), Attachment("c1", "net1", "rail", ("10.1.20.1/24",), ()), eth0_facts(1))
    with pytest.raises(InvalidConfig, match="no usable IP"):
        plan(config(), Attachment("c1", "net1", "rail", (), ()), eth0_facts(1))


def test_default_route_nic_moves_default_and_displaces_eth0():
    assert_plan(plan(config(podDefaultRouteNic="net1"), attachment(1), eth0_facts(1)),
                "overlay_default_nic")
    assert_plan(plan(config(podDefaultRouteNic="net3"), attachment(1), eth0_facts(1)),
                "overlay_default_nic_not_yet")


def sysctls(desired: Desired) -> dict[str, tuple[str, str]]:
    return {o.path: (o.value, "owned" if o in desired.pod_owned else "shared")
            for o in desired.pod_objects() if isinstance(o, Sysctl)}


@pytest.mark.parametrize("v6", [False, True])
def test_arp_isolation_sets_netk_only(v6):
    """arp_ignore/arp_announce on netK alone (owned: its DEL restores them); never on `all`,
    which would change eth0 too. IPv6-only rails get them as well."""
    att = attachment(2, v6)
    if v6:
        att = Attachment("c1", "net2", "rail", ("fd00:16:12::10/64",), ("fd00:16:12::254",))
    got = sysctls(plan(config(), att, eth0_facts(2, v6=v6)))
    want = {"net/ipv4/conf/net2/arp_ignore": ("1", "owned"),
            "net/ipv4/conf/net2/arp_announce": ("2", "owned"),
            "net/ipv4/conf/net2/rp_filter": ("0", "owned"),
            "net/ipv4/conf/all/rp_filter": ("0", "shared")}
    if v6:
        want["net/ipv6/conf/all/disable_ipv6"] = ("0", "shared")
    assert got == want
    off = sysctls(plan(config(podARPIsolation=False), att, eth0_facts(2, v6=v6)))
    assert off == {k: v for k, v in want.items() if "/arp_" not in k}


@pytest.mark.parametrize("kind, mac, alias, kept", [
    ("macvlan", "aa:00:00:00:01:01", "", ""),
    ("", "aa:00:00:00:01:01", "", "is a hardware netdev (a NIC or SR-IOV VF moved into the pod)"),
    ("veth", "aa:00:00:00:01:01", "vf1", "was moved into the pod (host-device keeps its node "
                                         "name 'vf1')"),
    ("ipoib", ":".join(["80"] * 20), "", "has a 20-byte hardware address, not an Ethernet MAC"),
])
def test_mac_prefix_rewrites_only_a_mac_the_pod_invented(kind, mac, alias, kept):
    """podMACPrefix rewrites a macvlan's random MAC; a netdev moved into the pod (host-device,
    sriov) keeps its own (the VF's spoof check passes only the MAC its PF set), and says so."""
    facts = eth0_facts(1)
    links = tuple(replace(link, kind=kind, mac=mac, alias=alias) if link.name == "net1" else link
                  for link in facts.pod.links)
    facts = replace(facts, pod=replace(facts.pod, links=links))
    att = replace(attachment(1), mac="0a:1b:ac:10:0b:0a")
    desired = plan(config(podMACPrefix="0a:1b"), att, facts)
    rewrites = [o.render() for o in desired.pod_owned if isinstance(o, LinkAttr)]
    if kept:
        assert rewrites == []
        assert f"podMACPrefix not applied: net1 {kept}; it keeps its MAC" in desired.warnings
    else:
        assert rewrites == [LinkAttr("net1", "address", "0a:1b:ac:10:0b:0a").render()]
        assert not any("podMACPrefix" in w for w in desired.warnings)


def test_shared_subnet_rails_each_route_the_subnet_via_themselves():
    """Rails in one subnet (one main-table prefix route per rail): every rail's table holds the
    subnet via its own rail with its own source, whatever order main lists them in."""
    links = [Link(1, "lo"), Link(2, "eth0", "veth", "aa:00:00:00:00:01", peer_index=9)]
    addrs = [Addr("eth0", 4, "10.233.119.164", 32)]
    main = [Route(4, MAIN_TABLE, "0.0.0.0/0", "eth0", gateway="169.254.1.1", proto=3)]
    for k in (1, 2, 3):
        links.append(Link(2 + k, f"net{k}", "macvlan", f"aa:00:00:00:01:0{k}"))
        addrs.append(Addr(f"net{k}", 4, f"172.16.0.1{k}", 16))
        main.append(Route(4, MAIN_TABLE, "172.16.0.0/16", f"net{k}", scope="link",
                          src=f"172.16.0.1{k}", proto=2))
    base = eth0_facts(0)
    facts = Facts(PodFacts(links=tuple(links), addrs=tuple(addrs), main_routes=tuple(main),
                           used_tables=frozenset({254, 255})), base.node)
    for k in (1, 2, 3):
        att = Attachment("c1", f"net{k}", "rail", (f"172.16.0.1{k}/16",), ("172.16.0.1",))
        desired = plan(config(), att, facts)
        table = desired.table
        subnet = [o for o in desired.pod_objects()
                  if isinstance(o, Route) and o.dst == "172.16.0.0/16"]
        assert subnet == [Route(4, table, "172.16.0.0/16", f"net{k}", scope="link",
                                src=f"172.16.0.1{k}")]
        assert Route(4, table, "0.0.0.0/0", f"net{k}", gateway="172.16.0.1") in desired.pod_owned
        assert Rule(4, 31000, table, f"172.16.0.1{k}/32") in desired.pod_owned
        assert not any(isinstance(o, Route) and o.table == MAIN_TABLE and o.dev.startswith("net")
                       for o in desired.pod_objects()), "main keeps the kernel's own routes"
        facts = Facts(PodFacts(links=facts.pod.links, addrs=facts.pod.addrs,
                               main_routes=facts.pod.main_routes,
                               used_tables=facts.pod.used_tables | {table}), facts.node)


def test_tune_pod_routes_false_keeps_node_side_only():
    assert_plan(plan(config(tunePodRoutes=False), attachment(1), eth0_facts(1)),
                "overlay_untuned")


# -- properties -------------------------------------------------------------------------------
scenarios = st.fixed_dictionaries({
    "nics": st.integers(1, 8), "v6": st.booleans(), "default_nic": st.sampled_from(
        ["", "eth0", "net1", "net2", "net8", "nope"]), "used": st.sets(st.integers(100, 110)),
    "tune": st.booleans(), "rp": st.sampled_from([-1, 0, 1, 2]),
})


def plans_for(s) -> list[Desired]:
    """Plan every attachment in order, feeding each table into the next run's facts."""
    conf = config(podDefaultRouteNic=s["default_nic"], tunePodRoutes=s["tune"],
                  podRPFilter=s["rp"])
    facts = eth0_facts(s["nics"], s["v6"], s["used"])
    out = []
    for k in range(1, s["nics"] + 1):
        desired = plan(conf, attachment(k, s["v6"]), facts)
        out.append(desired)
        pod = facts.pod
        facts = Facts(PodFacts(links=pod.links, addrs=pod.addrs, main_routes=pod.main_routes,
                               used_tables=pod.used_tables | {desired.table}), facts.node)
    return out


@settings(max_examples=150, deadline=None)
@given(scenarios)
def test_invariants(s):
    plans = plans_for(s)
    tables = [d.table for d in plans]
    assert len(set(tables)) == len(tables), "no two attachments share a table"
    assert all(t >= 101 and t not in s["used"] and t not in (253, 254, 255) for t in tables)
    assert plans == plans_for(s), "planning is deterministic"
    for desired in plans:
        netk = desired.ifname
        routes = [o for o in desired.pod_objects() if isinstance(o, Route)]
        for route in routes:
            assert route.dev in (netk, "eth0")
        for rule in (o for o in desired.pod_objects() if isinstance(o, Rule)):
            assert rule.priority == 31000
            if rule.table == desired.table:
                for family in desired.families:
                    assert any(r.table == rule.table and r.is_default and r.family == family
                               for r in routes), "a source rule's table has a default route"
        if s["tune"]:
            for family, cidr in ((4, "10.233.0.0/18"), (4, "169.254.0.0/16"),
                                 (6, "fd00:64::/64")):
                if family in desired.families:
                    assert any(r.table == desired.table and r.dst == cidr for r in routes), \
                        "cluster CIDRs are in every rail table"
        for obj in desired.node_objects():
            if isinstance(obj, Route):
                assert obj.table == HOST_TABLE and obj.dev == "cali1"
            elif isinstance(obj, Rule):
                assert (obj.table, obj.priority, obj.src) == (HOST_TABLE, 1000, "")
            else:
                assert isinstance(obj, Neighbour) and obj.dev == "cali1"
        for route in desired.displaced:
            assert route.table == MAIN_TABLE and route.is_default
        for route in routes:
            if route.family == 6:
                assert not route.src, "IPv6 routes never carry src"
            ipaddress.ip_network(route.dst)
        assert Desired.from_dict(desired.to_dict()) == desired


@pytest.mark.parametrize("address,match", [
    ("0.0.0.0/0", "not a unicast"), ("224.0.0.5/24", "not a unicast"),
    ("255.255.255.255/32", "not a unicast"), ("10.233.119.164/24", "eth0's address"),
    ("172.16.99.10/24", "does not have it"),
])
def test_prev_result_addresses_are_validated(address, match):
    """Addresses that are not netK's own unicast addresses are refused (code 7) before any
    change, instead of getting rules and node routes."""
    with pytest.raises(InvalidConfig, match=match):
        plan(config(), Attachment("c1", "net1", "rail", (address,), ()), eth0_facts(1))


def test_gateway_of_the_other_family_is_refused():
    from types import SimpleNamespace as NS

    from cniplugin.engine.attachment import attachment_from_result
    result = NS(interfaces=[NS(name="net1")], routes=[],
                ips=[NS(address="172.16.11.10/24", gateway="fd00:16:11::254", interface=0)])
    with pytest.raises(InvalidConfig, match="other family"):
        attachment_from_result(result, "net1", "c1", "rail", eth0_facts(1).pod)
