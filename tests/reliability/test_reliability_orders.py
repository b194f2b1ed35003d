"""Runtime call orders that kubelet, Multus and containerd really produce (issue 8, "Runtime orders").

Each test runs in both engine modes (in-process and resident) on a fresh lab, drives the real
chains ``[macvlan + host-local, route-tune]`` through the Python libcni mimic, and compares the
WHOLE pod and node state (rules of both families, every table, links, neighbours, sysctls, nft,
state files) with the state before the first ADD.
"""

from __future__ import annotations

import json

import pytest

from cniplugin.lab.runtime import CniFailure
from cniplugin.lab.topology import (CALI_LL6, CALI_MAC, HIJACK_GW4, POD_IP4, POD_IP6, ip_batch,
                                    run)
from harness.lab import delete_pod_netns
from harness.plugin import assert_cni_error
from harness.snapshot import snapshot_diff

pytestmark = [pytest.mark.netns]


def test_multus_failure_path_leaves_nothing(make_rig):
    """Delegate 3 of 3 fails (its gateway is down, ``detectGateway``): Multus DELs delegates 3, 2, 1
    in reverse, then the runtime DELs the whole pod again. Pod and node end exactly as before."""
    rig = make_rig("dual", rails=3)
    lab = rig.lab
    pod = rig.pod(per_rail={3: {"detectGateway": True}})
    before = rig.snapshot()
    lab.ip(lab.gw(3), "link", "set", "rail", "down")
    pod.add(1)
    pod.add(2)
    with pytest.raises(CniFailure) as failed:
        pod.add(3)
    assert failed.value.code == 11, failed.value  # gateway unreachable: try again later
    for _ in range(2):  # Multus' own rollback, then the runtime's DEL of the pod
        pod.delete_all()
    lab.ip(lab.gw(3), "link", "set", "rail", "up")
    rig.assert_unchanged(before, "after the Multus failure path")


def test_del_without_add_changes_nothing(make_rig):
    """DEL of an attachment that was never added succeeds (through the runtime, and route-tune alone
    with a prevResult naming addresses it never configured) and changes nothing."""
    rig = make_rig("4", rails=2)
    before = rig.snapshot()
    rig.pod().delete(1)
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "net2", "sandbox": rig.lab.pod_netns}],
            "ips": [{"address": "172.16.12.10/24", "gateway": "172.16.12.254", "interface": 0}]}
    reply = rig.rt("DEL", 2, prev)
    assert (reply.code, reply.stdout) == (0, b""), str(reply)
    rig.assert_unchanged(before, "after DEL without ADD")


def test_del_twice_is_idempotent(make_rig):
    """ADD two rails, DEL both, DEL both again: every DEL succeeds and the state is as before."""
    rig = make_rig("dual", rails=2)
    pod = rig.pod()
    before = rig.snapshot()
    pod.add_all()
    pod.delete_all()
    pod.delete_all()
    reply = rig.rt("DEL", 1, None)  # a third one, from a runtime that lost its cache
    assert reply.code == 0, str(reply)
    rig.assert_unchanged(before, "after DEL twice")


def test_check_after_del_is_a_clear_error(make_rig):
    """CHECK with the (stale) prevResult of a deleted attachment fails with code 104 naming the
    attachment and saying that no ADD state exists; it changes nothing."""
    rig = make_rig("4", rails=1)
    pod = rig.pod()
    before = rig.snapshot()
    result = pod.add(1)
    pod.delete(1)
    reply = rig.rt("CHECK", 1, result)
    err = assert_cni_error(reply, 104)
    assert "net1" in err["msg"] and "ADD" in err["msg"], err
    rig.assert_unchanged(before, "after CHECK following DEL")


def test_readd_after_netns_recreated_converges(make_rig):
    """The sandbox's netns dies without a DEL and a new one appears at the same path; ADD with the
    same container id and ifnames must configure the NEW netns from scratch (never reuse the old
    plan), leave exactly one node entry per rail, and a final DEL must clean pod and node."""
    rig = make_rig("dual", rails=2)
    lab = rig.lab
    pod = rig.pod()
    node_before = rig.snapshot()[lab.node]
    pod.add_all()
    recreate_pod(lab)
    fresh_pod = rig.snapshot()[lab.pod]
    for k in pod.rails:
        attach_by_hand(lab, k)
        pod.retry_add(k)  # route-tune alone, with the runtime's cached prevResult
    assert_rails_routed(lab, pod.rails)
    for fam in lab.families:
        table = json.loads(lab.ip(lab.node, "-j", f"-{fam}", "route", "show", "table", "500"))
        assert sorted((r["dst"], r["dev"]) for r in table) == \
            sorted((lab.rail_ip(k, fam), lab.cali) for k in pod.rails), table
    pod.delete_all()
    after = rig.snapshot()
    assert snapshot_diff({"pod": fresh_pod, "node": node_before, "files": []},
                         {"pod": after[lab.pod], "node": after[lab.node], "files": after["files"]}) == ""


# ---------------------------------------------------------------------------- helpers

def recreate_pod(lab) -> None:
    """Delete the pod netns (its veth and macvlans die with it) and build a new one at the same
    path: same eth0 addresses and routes, same node-side ``cali`` name and MAC, new inode."""
    delete_pod_netns(lab)
    run("ip", "netns", "add", lab.pod)
    run("ip", "netns", "exec", lab.pod, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0")
    node = [f"link add {lab.cali} address {CALI_MAC} type veth peer name eth0 netns {lab.pod}",
            f"link set {lab.cali} up"]
    pod = ["link set lo up", "link set eth0 up"]
    if "4" in lab.families:
        node.append(f"route add {POD_IP4}/32 dev {lab.cali} scope link")
        pod += [f"addr add {POD_IP4}/32 dev eth0", f"route add {HIJACK_GW4} dev eth0 scope link",
                f"route add default via {HIJACK_GW4} dev eth0"]
    if "6" in lab.families:
        node.append(f"route add {POD_IP6}/128 dev {lab.cali}")
        pod += [f"addr add {POD_IP6}/128 dev eth0 nodad", f"route add default via {CALI_LL6} dev eth0"]
    ip_batch(node, lab.node)
    run("ip", "netns", "exec", lab.node, "sysctl", "-qw", f"net.ipv4.conf.{lab.cali}.proxy_arp=1",
        f"net.ipv4.neigh.{lab.cali}.proxy_delay=0", f"net.ipv6.conf.{lab.cali}.proxy_ndp=1")
    ip_batch(pod, lab.pod)


def attach_by_hand(lab, k: int) -> None:
    """What macvlan + host-local do for rail k in the new netns (the runtime cannot repeat them)."""
    ip_batch([f"link add net{k} link rail{k} type macvlan mode bridge",
              f"link set net{k} netns {lab.pod}"], lab.node)
    lines = [f"addr add {lab.rail_ip(k, fam)}/{24 if fam == '4' else 64} dev net{k}"
             + ("" if fam == "4" else " nodad") for fam in lab.families]
    ip_batch(lines + [f"link set net{k} up"], lab.pod)


def assert_rails_routed(lab, rails) -> None:
    """From each rail address, traffic beyond rail k's gateway leaves through net k."""
    for k in rails:
        for fam in lab.families:
            got = lab.route_get(lab.pod, lab.behind_ip(k, fam), lab.rail_ip(k, fam))
            assert (got.get("dev"), got.get("gateway")) == (f"net{k}", lab.gw_ip(k, fam)), got
