"""Issue 3's DEL matrix, end to end through libcni: DEL must always succeed and leave the
pod and node exactly as before ADD (node side even when the pod netns is gone)."""

from __future__ import annotations

import pytest

from cniplugin.lab.topology import run, state_diff
from harness.routing import assert_rail_routing, pod_rules
from harness.snapshot import assert_same, ns_state, snapshot, without_dev

pytestmark = [pytest.mark.netns, pytest.mark.libcni]


def test_del_twice_and_without_prev_result(rail_pod):
    pod = rail_pod("dual", rails=3)
    lab = pod.lab
    before = snapshot(lab)
    pod.add_all()
    pod.delete(3)
    # Second DEL, as libcni sends it (no cache → no prevResult).  Only route-tune: Debian's
    # macvlan 1.1.1 itself fails a repeated DEL with "Link not found".
    pod.plugin_only("DEL", 3)
    # DEL with the cache removed by hand: route-tune finds its state without prevResult.
    (pod.penv.cache_dir / "results" / f"rail2-{pod.container_id}-net2").unlink()
    pod.delete(2)
    pod.delete(1)
    pod.plugin_only("DEL", 1)
    pod.plugin_only("DEL", 1, netns="")
    assert_same(before, snapshot(lab), "after DEL")


def test_del_with_empty_netns_cleans_the_node(rail_pod):
    pod = rail_pod("4", rails=2)
    lab = pod.lab
    node_before = ns_state(lab.node)
    pod.add_all()
    pod.delete_all(netns="")
    assert state_diff(node_before, ns_state(lab.node)) == ""


def test_del_after_netns_is_gone_cleans_the_node(rail_pod):
    pod = rail_pod("dual", rails=2)
    lab = pod.lab
    node_before = ns_state(lab.node)
    pod.add_all()
    run("ip", "netns", "del", lab.pod)
    pod.delete_all()
    pod.delete_all()
    # The pod's veth (and with it the node's cali end and its routes) died with the netns;
    # everything else on the node, rule 1000 included, must be as before ADD.
    assert state_diff(without_dev(node_before, lab.cali), ns_state(lab.node)) == ""


def test_del_after_interface_is_gone(rail_pod):
    pod = rail_pod("4", rails=3)
    lab = pod.lab
    before = snapshot(lab)
    pod.add_all()
    lab.ip(lab.pod, "link", "del", "net2")
    pod.delete(2)
    assert_rail_routing(pod, rails=[1, 3])
    pod.delete(3)
    pod.delete(1)
    assert_same(before, snapshot(lab), "after DEL")


def test_del_of_net3_alone_leaves_the_other_seven_working(rail_pod):
    pod = rail_pod("dual")
    lab = pod.lab
    pod.add_all()
    pod.delete(3)
    assert_rail_routing(pod, rails=[1, 2, 4, 5, 6, 7, 8])
    assert not [r for r in pod_rules(lab) if str(r["table"]) == "103"]
    assert lab.ip(lab.pod, "route", "show", "table", "all").count("net3") == 0
    for fam in lab.families:
        assert lab.rail_ip(3, fam) not in lab.ip(lab.node, f"-{fam}", "route", "show", "table", "500")
        assert lab.rail_ip(3, fam) not in lab.ip(lab.node, "neigh", "show")
    for k in (1, 2, 4, 5, 6, 7, 8):
        pod.check(k)
