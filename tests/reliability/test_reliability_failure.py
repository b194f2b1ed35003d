"""Failure mid-ADD (issue 8): a later step fails, and ADD's own rollback leaves nothing behind.

route-tune runs alone after the interface plugin (macvlan + host-local), so "before" is the state
the runtime hands it. Each test makes one step of ADD fail and compares the whole pod and node
state (rules, tables, links, neighbours, sysctls, nft, state files) with "before" WITHOUT any DEL:
the failed ADD itself must have undone everything. Then it removes the obstacle and shows that a
retried ADD converges and a DEL cleans up. Both engine modes.
"""

from __future__ import annotations

import re

import pytest

from harness.host import wait_until
from harness.plugin import assert_cni_error

pytestmark = [pytest.mark.netns]


def converge_and_clean(rig, prevs: dict[int, dict], before: dict, keys: dict | None = None) -> None:
    """With the obstacle gone: ADD every rail in ``prevs`` succeeds, DEL returns to ``before``."""
    for k, prev in prevs.items():
        reply = rig.rt("ADD", k, prev, keys=keys)
        assert reply.code == 0, str(reply)
    for k, prev in reversed(prevs.items()):
        reply = rig.rt("DEL", k, prev, keys=keys)
        assert reply.code == 0, str(reply)
    rig.assert_unchanged(before, "after the retried ADD and DEL")


def test_host_peer_down_fails_add_after_the_pod_side(make_rig):
    """The pod's host-side veth peer is down, so the node step - after the whole pod side was
    applied - fails (the kernel refuses ``<rail ip>/32 dev <peer>``): code 103 naming the peer,
    and the rollback removes the pod side again. With the peer up again, ADD converges."""
    rig = make_rig("4", rails=1)
    lab = rig.lab
    prev = rig.bare().add(1)
    peer_down(lab)
    before = rig.snapshot()
    err = assert_cni_error(rig.rt("ADD", 1, prev), 103)
    assert lab.cali in err["msg"], err
    rig.assert_unchanged(before, "after ADD failed at the node step")
    peer_up(lab)
    converge_and_clean(rig, {1: prev}, rig.snapshot())


def test_identical_foreign_rule_is_left_alone(make_rig):
    """A hand-made rule with the selector of route-tune's node rule (pref 1000, from all, table
    500) but another protocol is a different rule to the kernel: ADD succeeds next to it, and DEL
    removes route-tune's rule only - the foreign one survives, untouched."""
    rig = make_rig("dual", rails=1)
    lab = rig.lab
    prev = rig.bare().add(1)
    lab.ip(lab.node, "-6", "rule", "add", "from", "all", "lookup", "500", "pref", "1000")
    before = rig.snapshot()
    converge_and_clean(rig, {1: prev}, before)


def test_foreign_route_on_the_node_key_is_not_clobbered(make_rig):
    """A foreign route already holds the exact node key route-tune needs (``172.16.11.10/32`` in
    table 500). route-tune must not overwrite it: ADD fails with code 103 and changes nothing."""
    rig = make_rig("4", rails=1)
    lab = rig.lab
    prev = rig.bare().add(1)
    lab.ip(lab.node, "route", "add", "172.16.11.10/32", "dev", "rail1", "table", "500")
    before = rig.snapshot()
    assert_cni_error(rig.rt("ADD", 1, prev), 103)
    rig.assert_unchanged(before, "after ADD met a foreign route in hostRuleTable")


def test_foreign_route_in_pod_main_is_not_clobbered(make_rig):
    """The pod's main table already has a foreign route for a cluster CIDR route-tune installs
    (``10.233.0.0/18``, e.g. from the cluster CNI). route-tune must not take it over: either ADD
    fails with code 103 changing nothing, or it succeeds and DEL gives the foreign route back."""
    rig = make_rig("4", rails=1)
    lab = rig.lab
    prev = rig.bare().add(1)
    lab.ip(lab.pod, "route", "add", "10.233.0.0/18", "via", "169.254.1.1", "dev", "eth0", "proto", "static")
    before = rig.snapshot()
    reply = rig.rt("ADD", 1, prev)
    if reply.code != 0:
        assert_cni_error(reply, 103)
        rig.assert_unchanged(before, "after ADD met a foreign pod route")
        return
    reply = rig.rt("DEL", 1, prev)
    assert reply.code == 0, str(reply)
    rig.assert_unchanged(before, "after ADD + DEL over a foreign pod route")


def test_unreachable_gateway_rolls_back_link_attributes(make_rig):
    """``detectGateway`` with the rail's gateway down: code 11 (try again later). The MAC rewrite
    (``podMACPrefix``) and ``txQueueLen`` applied before the probe are undone; nothing else was
    changed. With the gateway back, ADD converges."""
    rig = make_rig("dual", rails=1)
    lab = rig.lab
    keys = {"detectGateway": True, "podMACPrefix": "0a:1b", "txQueueLen": 4321,
            "detectOptions": {"retries": 2, "timeout": "500ms"}}
    prev = rig.bare().add(1)
    gateway_down(lab, 1)
    before = rig.snapshot()
    err = assert_cni_error(rig.rt("ADD", 1, prev, keys=keys), 11)
    # The whole error; only the measured wait (ms) varies.
    assert err["cniVersion"] == rig.conf(1)["cniVersion"]
    assert re.fullmatch(
        r"gateway 172\.16\.11\.254 is unreachable from net1: no answer to 2 ARP request\(s\) from "
        r"172\.16\.11\.10 within \d+ ms; check that 172\.16\.11\.254 is the gateway of this "
        r"address's pool, that it is up and on the same L2 segment/VLAN as net1, and that nothing "
        r"on the way drops ARP", err["msg"]), err
    assert re.fullmatch(r"interface=net1 gateway=172\.16\.11\.254 source=172\.16\.11\.10 tries=2 "
                        r"waited=\d+ ms", err["details"]), err
    rig.assert_unchanged(before, "after ADD failed on an unreachable gateway")
    gateway_up(lab, 1)
    converge_and_clean(rig, {1: prev}, rig.snapshot(), keys=keys)


def test_failed_second_rail_keeps_the_first(make_rig):
    """Rail 1 is configured; rail 2's ADD fails at the node step (host peer down). The rollback
    must keep everything rail 1 shares (table 100, eth0 rule, main routes, node rule of table
    500): the state equals the state right after rail 1's ADD."""
    rig = make_rig("4", rails=2)
    lab = rig.lab
    bare = rig.bare()
    prevs = {k: bare.add(k) for k in (1, 2)}
    before_all = rig.snapshot()
    assert rig.rt("ADD", 1, prevs[1]).code == 0
    peer_down(lab)
    if rig.engine == "resident":
        # The link going down flushed rail 1's PERMANENT node neighbour; the engine puts it back
        # (its route cannot be, on a down link): the state to compare with is after that repair.
        wait_until(lambda: lab.rail_ip(1, "4") in lab.ip(lab.node, "neigh", "show", "dev", lab.cali),
                   what="the engine to repair rail 1's node neighbour")
    after_rail1 = rig.snapshot()
    assert_cni_error(rig.rt("ADD", 2, prevs[2]), 103)
    rig.assert_unchanged(after_rail1, "after rail 2 failed")
    peer_up(lab)
    assert rig.rt("DEL", 1, prevs[1]).code == 0
    rig.assert_unchanged(before_all, "after DEL of rail 1")


def peer_down(lab) -> None:
    lab.ip(lab.node, "link", "set", lab.cali, "down")


def peer_up(lab) -> None:
    """Up again, with the node's route to the pod that died with the link put back."""
    lab.ip(lab.node, "link", "set", lab.cali, "up")
    lab.ip(lab.node, "route", "replace", "10.233.119.164/32", "dev", lab.cali, "scope", "link")


def gateway_down(lab, k: int) -> None:
    lab.ip(lab.gw(k), "link", "set", "rail", "down")


def gateway_up(lab, k: int) -> None:
    """Up again; IPv6 addresses died with the link (keep_addr_on_down=0), so put them back."""
    lab.ip(lab.gw(k), "link", "set", "rail", "up")
    if "6" in lab.families:
        lab.ip(lab.gw(k), "addr", "replace", f"{lab.gw_ip(k, '6')}/64", "dev", "rail", "nodad")
