"""Differential test: Debian's `sbr` vs route-tune on the same single-rail chain.

Both labs run `[macvlan(rail1, host-local), X]` through libcni.  Same behaviour for the rail
(source rule → own table → gateway), different state; every difference is listed in
docs/lab.md ("sbr differential") and asserted exactly here, so a new one fails the test.
"""

from __future__ import annotations

import json

import pytest

from cniplugin.lab.runtime import Libcni, RailPod
from harness.routing import pod_rules

pytestmark = [pytest.mark.netns, pytest.mark.libcni]


def table(lab, name):
    """IPv4+IPv6 routes of table `name`, reduced to what routing depends on (no table/proto/metric)."""
    out = set()
    for fam in ("-4", "-6"):
        proc = lab.exec(lab.pod, "ip", "-j", fam, "route", "show", "table", name, check=False)
        # A table that does not exist makes `ip -j` exit non-zero after printing "[".
        for r in json.loads(proc.stdout) if proc.returncode == 0 else []:
            out.add((r["dst"], r.get("gateway", ""), r.get("dev", ""), r.get("scope", ""), r.get("prefsrc", "")))
    return out


def rules(lab):
    return {(r["src"], str(r["table"])) for r in pod_rules(lab)}


def node_state(lab):
    """The node's rules and routes of every table (both families), order-free."""
    return ({json.dumps(r, sort_keys=True) for r in json.loads(lab.ip(lab.node, "-j", "route", "show", "table", "all"))},
            lab.ip(lab.node, "rule"), lab.ip(lab.node, "-6", "rule"))


def test_route_tune_vs_sbr(overlay_lab, plugin_env, libcni):
    pods, node_before = {}, {}
    for chained in ("sbr", "route-tune"):
        lab = overlay_lab("4", rails=1)
        penv = plugin_env("4", name=lab.prefix)
        pods[chained] = RailPod(lab, penv, Libcni(lab.node, penv, libcni), chained=chained)
        node_before[chained] = node_state(lab)
        pods[chained].add(1)
    sbr, rt = pods["sbr"].lab, pods["route-tune"].lab
    ip, gw, eth0 = rt.rail_ip(1, "4"), rt.gw_ip(1, "4"), rt.pod_ip("4")

    # Same behaviour for the rail address.
    for lab in (sbr, rt):
        got = lab.route_get(lab.pod, lab.behind_ip(1, "4"), ip)
        assert (got["dev"], got.get("gateway")) == ("net1", gw)
        assert lab.ping(lab.pod, ip, lab.behind_ip(1, "4"))["ok"]

    # Difference 1: tables. sbr uses 100 for net1; route-tune keeps 100 for eth0's replies.
    assert rules(sbr) == {(ip, "100")}
    assert rules(rt) == {(ip, "101"), (eth0, "100")}
    # Difference 2: route-tune's rail table also sends cluster and node traffic to eth0;
    # sbr copies net1's fe80::/64 into it, route-tune does not.
    cluster = {(d, "10.1.20.4", "eth0", "", "") for d in ("10.233.0.0/18", "10.233.64.0/18", "169.254.0.0/16")}
    node_ip = {("10.1.20.4", "", "eth0", "link", "")}
    src_hinted = {(d, g, dev, scope, eth0) for d, g, dev, scope, _ in cluster | node_ip}
    sbr_t, rt_t = table(sbr, "100"), table(rt, "101")
    assert sbr_t - rt_t == {("fe80::/64", "", "net1", "", "")}
    assert rt_t - sbr_t == src_hinted  # eth0's address as prefsrc: replies leave from it
    # Difference 3: sbr empties net1's main-table routes (connected + fe80::/64); route-tune
    # keeps them and adds the cluster/node routes via eth0 to main.
    sbr_main, rt_main = table(sbr, "main"), table(rt, "main")
    assert sbr_main < rt_main
    kept = {("172.16.11.0/24", "", "net1", "link", ip), ("fe80::/64", "", "net1", "", "")}
    assert rt_main - sbr_main == kept | src_hinted
    # Difference 4: route-tune's eth0 reply table; sbr has none.
    assert table(rt, "100") == {("default", "169.254.1.1", "eth0", "", ""), ("169.254.1.1", "", "eth0", "link", "")}
    # Difference 5: only route-tune touches the node (rule 1000 → table 500, /32 via cali).
    assert node_state(sbr) == node_before["sbr"]
    (rt_routes, rt_rules, rt_rules6), (routes0, rules0, rules6_0) = node_state(rt), node_before["route-tune"]
    assert {json.loads(r)["dst"] for r in rt_routes - routes0} == {ip} and not routes0 - rt_routes
    assert [line for line in rt_rules.splitlines() if line not in rules0.splitlines()] == [
        "1000:\tfrom all lookup 500 proto 231"]
    assert rt_rules6 == rules6_0  # an IPv4-only pod: no IPv6 node rule
    for pod in pods.values():
        pod.delete(1)
