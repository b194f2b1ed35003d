"""Issue 3 end to end: the 8-rail overlay pod through Debian's libcni and route-tune.

Each test builds its own lab (prefix rtC...), runs `[macvlan, route-tune]` per rail through
the Go libcni runner, asserts the outcomes by behaviour (route lookups, pings) and compares
the WHOLE pod and node state before ADD and after DEL.
"""

from __future__ import annotations

import json

import pytest

from cniplugin.lab.runtime import CniFailure
from harness.routing import assert_rail_routing, pod_rules
from harness.snapshot import assert_same, snapshot

pytestmark = [pytest.mark.netns, pytest.mark.libcni]


def assert_restored(pod, before):
    assert_same(before, snapshot(pod.lab), "after DEL")


def check_delete_restored(pod, before):
    """CHECK passes on every rail; DEL of all of them restores ``before`` exactly."""
    for k in pod.rails:
        pod.check(k)
    pod.delete_all()
    assert_restored(pod, before)


@pytest.mark.parametrize("family", ["4", "6", "dual"])
def test_eight_rail_pod(rail_pod, family):
    pod = rail_pod(family)
    lab = pod.lab
    before = snapshot(pod.lab)
    pod.add_all()
    for k in pod.rails:
        result = pod.results[k]
        assert result["interfaces"][0]["name"] == f"net{k}"
        assert sorted(ip["address"].split("/")[0] for ip in result["ips"]) == sorted(
            lab.rail_ip(k, f) for f in lab.families)
    assert_rail_routing(pod)
    # Table numbering: eth0's reply table 100, netK → 100+K, every rule at 31000.
    rules = {(r["src"], str(r["table"]), r["priority"]) for r in pod_rules(lab)}
    want = {(lab.pod_ip(f), "100", 31000) for f in lab.families}
    want |= {(lab.rail_ip(k, f), str(100 + k), 31000) for k in pod.rails for f in lab.families}
    assert rules == want
    # Node: one rule per family to table 500, a /32|/128 per rail address via the cali veth.
    for fam in lab.families:
        node_rules = json.loads(lab.ip(lab.node, "-j", f"-{fam}", "rule", "show"))
        assert [r for r in node_rules if str(r.get("table")) == "500"] == [
            {"priority": 1000, "src": "all", "table": "500", "protocol": "231"}]
        table = json.loads(lab.ip(lab.node, "-j", f"-{fam}", "route", "show", "table", "500"))
        assert sorted((r["dst"], r["dev"]) for r in table) == sorted(
            (lab.rail_ip(k, fam), lab.cali) for k in pod.rails)
    if "4" in lab.families:
        sysctl = lab.state(lab.pod)["sysctl"]
        for dev in ["all"] + [f"net{k}" for k in pod.rails]:
            assert sysctl[f"net.ipv4.conf.{dev}.rp_filter"] == "0"
    sysctl = lab.state(lab.pod)["sysctl"]  # ARP isolation on every rail, whatever its families
    for k in pod.rails:
        assert (sysctl[f"net.ipv4.conf.net{k}.arp_ignore"],
                sysctl[f"net.ipv4.conf.net{k}.arp_announce"]) == ("1", "2")
    assert sysctl["net.ipv4.conf.all.arp_ignore"] == sysctl["net.ipv4.conf.eth0.arp_ignore"] == "0"
    check_delete_restored(pod, before)


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_cni_versions(rail_pod, version):
    pod = rail_pod("dual", rails=2, cni_version=version)
    before = snapshot(pod.lab)
    pod.add_all()
    for result in pod.results.values():
        assert result["cniVersion"] == version
        assert all(("version" in ip) == (version == "0.4.0") for ip in result["ips"])
    assert_rail_routing(pod)
    check_delete_restored(pod, before)


@pytest.mark.parametrize("nic", ["net1", "net8"])
def test_pod_default_route_nic(rail_pod, nic):
    pod = rail_pod("4", keys={"podDefaultRouteNic": nic})
    lab = pod.lab
    before = snapshot(pod.lab)
    for k in pod.rails:
        pod.add(k)
        if k < int(nic[3:]):
            # net8 is attached last: until then the default stays on eth0.
            assert lab.route_get(lab.pod, "192.0.2.1")["dev"] == "eth0", f"after net{k}"
    got = lab.route_get(lab.pod, "192.0.2.1")
    assert (got["dev"], got.get("gateway")) == (nic, lab.gw_ip(int(nic[3:]), "4"))
    assert_rail_routing(pod, default_nic=nic)
    check_delete_restored(pod, before)


def test_retried_add_converges(rail_pod):
    pod = rail_pod("dual", rails=3)
    before = snapshot(pod.lab)
    pod.add_all()
    after_add = snapshot(pod.lab)
    for k in pod.rails:
        again = pod.retry_add(k)
        # The retry's result is the first one, except that an empty "dns" may be left out.
        assert {"dns": {}, **again} == pod.results[k]
    assert_same(after_add, snapshot(pod.lab), "retried ADD")
    assert_rail_routing(pod)
    pod.delete_all()
    assert_restored(pod, before)


DRIFTS = {
    "pod rule": lambda lab: lab.ip(lab.pod, "rule", "del", "from", lab.rail_ip(3, "4"), "table", "103",
                                   "pref", "31000"),
    "pod table route": lambda lab: lab.ip(lab.pod, "route", "del", "default", "table", "103"),
    "node table-500 route": lambda lab: lab.ip(lab.node, "route", "del", lab.rail_ip(3, "4"), "table", "500"),
    "node neighbour": lambda lab: lab.ip(lab.node, "neigh", "del", lab.rail_ip(3, "4"), "dev", lab.cali),
}
#: The object CHECK reports missing after each drift (``mac``: the node neighbour's lladdr).
MISSING = {
    "pod rule": lambda pod, mac: "pod: missing: ip rule add from 172.16.13.10/32 lookup 103 pref 31000 proto 231",
    "pod table route": lambda pod, mac: "pod: missing: ip route replace default via 172.16.13.254 dev net3 "
                                   "table 103 proto 231",
    "node table-500 route": lambda pod, mac: f"node: missing: ip route replace 172.16.13.10 dev {pod.lab.cali} "
                                        "scope link table 500 proto 231",
    "node neighbour": lambda pod, mac: f"node: missing: ip neigh replace 172.16.13.10 lladdr {mac} "
                                       f"dev {pod.lab.cali} nud permanent proto 231",
}


@pytest.mark.parametrize("drift", list(DRIFTS))
def test_check_names_the_drift(rail_pod, drift):
    pod = rail_pod("4", rails=4)
    pod.add_all()
    pod.check(3)
    # A later chained plugin changing unrelated main-table routes is fine.
    pod.lab.ip(pod.lab.pod, "route", "add", "198.51.100.0/24", "via", pod.lab.gw_ip(2, "4"), "dev", "net2")
    pod.check(3)
    (neighbour,) = json.loads(pod.lab.ip(pod.lab.node, "-j", "neigh", "show", pod.lab.rail_ip(3, "4"),
                                         "dev", pod.lab.cali))
    DRIFTS[drift](pod.lab)
    with pytest.raises(CniFailure) as err:
        pod.check(3)
    assert (err.value.msg, err.value.details) == (
        f"1 route-tune object(s) of net3 drifted: {MISSING[drift](pod, neighbour['lladdr'])}", "")
    for k in (1, 2, 4):
        pod.check(k)  # the other attachments did not drift
