"""Engine tests on a real kernel: a Calico-style pod eth0 plus macvlan rails, in namespaces.

Topology (every namespace is prefixed ``rtB`` and removed afterwards):

    gwK ns: gw 172.16.1K.254/24 + fd00:16:1K::254/64, lo 10.100.K.1 (only gwK has it)
       | veth
    node ns: rtBrK (macvlan master), rtBup0 10.1.20.4/24 (node IP), rtBcali0 (eth0's peer,
       | proxy_arp, ee:ee:ee:ee:ee:ee)             route 10.233.119.164 dev rtBcali0
    pod ns: eth0 10.233.119.164/32 default via 169.254.1.1; netK macvlan on rtBrK

route-tune runs as the installed ``route-tune`` executable inside the node namespace, exactly as
a runtime runs it (env + stdin), with a node defaults file pointing stateDir at a temp dir.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from harness.plugin import details_repeat
from harness.kernel import nsx, ok, pings, route_get, sh, table_of
from harness.topologies import CALICO_CID as CID
from harness.topologies import CalicoRails as Topology
from harness.snapshot import ns_state, without_dev

pytestmark = pytest.mark.netns
@pytest.fixture
def topo(calico_rails) -> Topology:
    return calico_rails()


# -- running route-tune -----------------------------------------------------------------------
def conf(topo: Topology, prev: dict | None = None, **keys) -> dict:
    config = {"cniVersion": "1.0.0", "name": "rail", "type": "route-tune",
              "overlayPodCIDR": ["10.233.64.0/18"], "serviceCIDR": ["10.233.0.0/18"],
              "hijackCIDR": ["169.254.0.0/16"], **keys}
    if topo.v6:
        config["serviceCIDR"] = [*config["serviceCIDR"], "fd00:96::/112"]
    if prev is not None:
        config["prevResult"] = prev
    return config


def run(topo: Topology, command: str, ifname: str, config: dict,
        netns: str | None = None) -> subprocess.CompletedProcess:
    return topo.run(command, ifname, config, netns)


def add(topo: Topology, k: int, ifname: str = "", **keys) -> dict:
    ifname = ifname or f"net{k}"
    prev = topo.attach(k, ifname)
    result = ok(run(topo, "ADD", ifname, conf(topo, prev, **keys)))
    return result


# -- observing ---------------------------------------------------------------------------------
def rail_ip(k: int, family: int = 4) -> str:
    return f"172.16.1{k}.10" if family == 4 else f"fd00:16:1{k}::10"


# -- tests -------------------------------------------------------------------------------------
def test_three_rails_route_and_reach(topo):
    pod_before, node_before = ns_state(topo.pod), ns_state(topo.node)
    for k in (1, 2, 3):
        add(topo, k)
    p, n = topo.pod, topo.node
    for k in (1, 2, 3):
        src = rail_ip(k)
        got = route_get(p, "8.8.8.8", src)
        assert got["dev"] == f"net{k}" and got["gateway"] == f"172.16.1{k}.254"
        assert table_of(p, "8.8.8.8", src) == str(100 + k)
        # Cluster traffic stays on eth0 whatever the source (coordinator leaks net1's).
        assert route_get(p, "10.233.0.10", src)["dev"] == "eth0"
        assert route_get(p, "10.1.20.4", src)["dev"] == "eth0"
        assert pings(p, f"172.16.1{k}.254", src)
        assert pings(p, f"10.100.{k}.1", src), f"rail {k} must reach what only gw{k} has"
        assert not pings(p, f"10.100.{k % 3 + 1}.1", src)
        assert pings(n, src, "10.1.20.4"), "the node reaches every rail IP through eth0"
    # Unsourced traffic and eth0 replies stay on eth0.
    assert route_get(p, "8.8.8.8")["dev"] == "eth0"
    assert table_of(p, "8.8.8.8", "10.233.119.164") == "100"
    assert nsx(p, "sysctl", "-n", "net.ipv4.conf.all.rp_filter").strip() == "0"
    assert nsx(p, "sysctl", "-n", "net.ipv4.conf.net2.rp_filter").strip() == "0"
    rules = nsx(p, "ip", "rule", "show")
    assert rules.count("lookup 100") == 1
    assert "31000:\tfrom 172.16.11.10 lookup 101 proto 231" in rules
    assert "1000:\tfrom all lookup 500 proto 231" in nsx(n, "ip", "rule", "show")
    table500 = nsx(n, "ip", "route", "show", "table", "500")
    assert all(f"{rail_ip(k)} dev rtBcali0" in table500 for k in (1, 2, 3))
    # CHECK passes; DEL in reverse order restores pod and node exactly.
    for k in (1, 2, 3):
        ok(run(topo, "CHECK", f"net{k}", conf(topo, topo_prev(topo, k))))
    for k in (3, 2, 1):
        ok(run(topo, "DEL", f"net{k}", conf(topo)))
        nsx(p, "ip", "link", "del", f"net{k}")
    assert ns_state(p) == pod_before
    assert ns_state(n) == node_before
    assert not os.listdir(os.path.join(topo.tmp, "state", "attachments"))


def topo_prev(topo: Topology, k: int, ifname: str = "") -> dict:
    ifname = ifname or f"net{k}"
    ips = []
    if topo.v4:
        ips.append({"address": f"172.16.1{k}.10/24", "gateway": f"172.16.1{k}.254",
                    "interface": 0})
    if topo.v6:
        ips.append({"address": f"fd00:16:1{k}::10/64", "gateway": f"fd00:16:1{k}::254",
                    "interface": 0})
    return {"cniVersion": "1.0.0", "ips": ips,
            "interfaces": [{"name": ifname, "sandbox": f"/var/run/netns/{topo.pod}"}]}


def test_del_matrix(topo):
    """DEL: twice, without prevResult, empty CNI_NETNS, gone interface, gone netns, no ADD."""
    pod_before, node_before = ns_state(topo.pod), ns_state(topo.node)
    ok(run(topo, "DEL", "net9", conf(topo)))                      # never added
    add(topo, 1)
    add(topo, 2)
    ok(run(topo, "DEL", "net2", conf(topo), netns=""))            # empty CNI_NETNS: node only
    assert rail_ip(2) not in nsx(topo.node, "ip", "route", "show", "table", "500")
    ok(run(topo, "DEL", "net2", conf(topo)))                      # again: nothing left to do
    nsx(topo.pod, "ip", "link", "del", "net1")                    # interface gone
    ok(run(topo, "DEL", "net1", conf(topo)))
    ok(run(topo, "DEL", "net1", conf(topo)))
    nsx(topo.pod, "ip", "link", "del", "net2")
    # net2's pod-side objects survive (netns was unknown at its DEL): only table 102 routes on
    # the deleted link vanished with it, and its rule stays; that is the documented cost of
    # DEL without CNI_NETNS. Everything else is back.
    rules4 = ns_state(topo.pod)["rules4"]
    assert [r for r in rules4 if r.get("src") != "172.16.12.10"] == pod_before["rules4"]
    assert ns_state(topo.node) == node_before


def test_del_with_netns_gone_cleans_node(topo):
    node_before = ns_state(topo.node)
    add(topo, 1)
    add(topo, 2)
    sh("ip", "netns", "del", topo.pod)
    for k in (2, 1):
        ok(run(topo, "DEL", f"net{k}", conf(topo)))
        ok(run(topo, "DEL", f"net{k}", conf(topo)))
    # The pod's veth died with its netns (and the Calico-style route on it); the rest, including
    # the node rule route-tune added, must be exactly as before.
    assert without_dev(ns_state(topo.node), "rtBcali0") == without_dev(node_before, "rtBcali0")
    assert not os.listdir(os.path.join(topo.tmp, "state", "attachments"))


def test_del_one_rail_leaves_others(topo):
    for k in (1, 2, 3):
        add(topo, k)
    ok(run(topo, "DEL", "net2", conf(topo)))
    nsx(topo.pod, "ip", "link", "del", "net2")
    for k in (1, 3):
        assert table_of(topo.pod, "8.8.8.8", rail_ip(k)) == str(100 + k)
        assert pings(topo.pod, f"10.100.{k}.1", rail_ip(k))
        assert pings(topo.node, rail_ip(k), "10.1.20.4")
        ok(run(topo, "CHECK", f"net{k}", conf(topo, topo_prev(topo, k))))
    assert "lookup 102" not in nsx(topo.pod, "ip", "rule")
    assert rail_ip(2) not in nsx(topo.node, "ip", "route", "show", "table", "500")


def test_check_detects_drift_and_ignores_unrelated_main_routes(topo):
    add(topo, 1)
    add(topo, 2)
    check = lambda k: run(topo, "CHECK", f"net{k}", conf(topo, topo_prev(topo, k)))
    nsx(topo.pod, "ip", "route", "add", "192.0.2.0/24", "dev", "net2")  # a later plugin's route
    ok(check(2))
    nsx(topo.pod, "ip", "route", "del", "default", "table", "102")
    failed = check(2)
    assert failed.returncode == 1
    reply = json.loads(failed.stdout)
    assert reply["code"] == 104 and "table 102" in reply["msg"] and "missing" in reply["msg"]
    assert "details" not in reply, "one drift: msg names it, details would only repeat it"
    # Two more drifts: msg names the first, details the others, each drift exactly once.
    nsx(topo.pod, "sysctl", "-qw", "net.ipv4.conf.net2.arp_ignore=0")
    nsx(topo.pod, "ip", "rule", "del", "pref", "31000", "from", "172.16.12.10", "table", "102")
    reply = json.loads(check(2).stdout)
    assert reply["msg"].startswith("3 route-tune object(s) of net2 drifted: pod: changed: "
                                   "sysctl -w net/ipv4/conf/net2/arp_ignore=1 (live: 0)"), reply
    text = f"{reply['msg']}; {reply['details']}"  # what libcni prints
    for drift in ("arp_ignore=1", "default via 172.16.12.254", "from 172.16.12.10/32"):
        assert text.count(drift) == 1, (drift, text)
    assert details_repeat(reply["msg"], reply["details"]) == ""
    ok(check(1))
    nsx(topo.node, "ip", "route", "replace", "172.16.11.10", "dev", "rtBup0", "table", "500",
        "proto", "231")
    assert "node: changed" in json.loads(check(1).stdout)["msg"]
    # C3: a prevResult whose sandbox is another netns.
    prev = topo_prev(topo, 2)
    prev["interfaces"][0]["sandbox"] = "/var/run/netns/elsewhere"
    assert json.loads(run(topo, "CHECK", "net2", conf(topo, prev)).stdout)["code"] == 104


def test_retried_add_converges(topo):
    prev = topo.attach(1)
    ok(run(topo, "ADD", "net1", conf(topo, prev)))
    pod_once, node_once = ns_state(topo.pod), ns_state(topo.node)
    ok(run(topo, "ADD", "net1", conf(topo, prev)))
    assert ns_state(topo.pod) == pod_once and ns_state(topo.node) == node_once
    add(topo, 2)
    ok(run(topo, "ADD", "net1", conf(topo, prev)))
    assert table_of(topo.pod, "8.8.8.8", rail_ip(1)) == "101"
    assert table_of(topo.pod, "8.8.8.8", rail_ip(2)) == "102"


@pytest.mark.parametrize("default_nic", ["net1", "net3"])
def test_pod_default_route_nic(topo, default_nic):
    pod_before = ns_state(topo.pod)
    for k in (1, 2, 3):
        add(topo, k, podDefaultRouteNic=default_nic)
        want = default_nic if k >= int(default_nic[-1]) else "eth0"
        assert route_get(topo.pod, "8.8.8.8")["dev"] == want
    k = int(default_nic[-1])
    assert pings(topo.pod, f"10.100.{k}.1", rail_ip(k))
    assert route_get(topo.pod, "10.233.0.10")["dev"] == "eth0"
    assert table_of(topo.pod, "8.8.8.8", "10.233.119.164") == "100"
    assert route_get(topo.pod, "8.8.8.8", "10.233.119.164")["dev"] == "eth0"
    for j in (3, 2, 1):
        ok(run(topo, "DEL", f"net{j}", conf(topo, podDefaultRouteNic=default_nic)))
        nsx(topo.pod, "ip", "link", "del", f"net{j}")
    assert ns_state(topo.pod) == pod_before


@pytest.mark.parametrize("v4,v6", [(False, True), (True, True)], ids=["v6", "dual"])
def test_ipv6_and_dual_stack(calico_rails, v4, v6):
    topo = calico_rails(rails=2, v4=v4, v6=v6)
    pod_before, node_before = ns_state(topo.pod), ns_state(topo.node)
    for k in (1, 2):
        add(topo, k)
    for k in (1, 2):
        src = rail_ip(k, 6)
        got = route_get(topo.pod, "2001:db8::1", src)
        assert got["dev"] == f"net{k}" and got["gateway"] == f"fd00:16:1{k}::254"
        assert route_get(topo.pod, "fd00:96::10", src)["dev"] == "eth0"
        assert pings(topo.pod, f"fd00:100:{k}::1", src)
        assert pings(topo.node, src, "fd00:1:20::4")
        if v4:
            assert pings(topo.pod, f"10.100.{k}.1", rail_ip(k))
        ok(run(topo, "CHECK", f"net{k}", conf(topo, topo_prev(topo, k))))
    for k in (2, 1):
        ok(run(topo, "DEL", f"net{k}", conf(topo)))
        nsx(topo.pod, "ip", "link", "del", f"net{k}")
    assert ns_state(topo.pod) == pod_before and ns_state(topo.node) == node_before


def test_failed_add_rolls_back_everything(topo):
    """A fault at every apply step leaves pod, node and state exactly as before."""
    from cniplugin.engine import faults as _faults
    from cniplugin.kernel import netns as _netns
    from cniplugin.transport.plugin import serve_request
    add(topo, 1)
    prev = topo.attach(2)
    pod_before, node_before = ns_state(topo.pod), ns_state(topo.node)
    points: list[str] = []
    environ = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": CID, "CNI_IFNAME": "net2",
               "CNI_NETNS": f"/var/run/netns/{topo.pod}", "CNI_PATH": "/usr/lib/cni",
               "ROUTE_TUNE_DEFAULTS": os.path.join(topo.tmp, f"{topo.tag}-defaults.json")}
    stdin = json.dumps(conf(topo, prev)).encode()
    node_fd = _netns.open_netns(f"/var/run/netns/{topo.node}")
    try:
        _faults.hook = points.append
        assert serve_request(environ, stdin, node_netns_fd=node_fd).exit_code == 0
        ok(run(topo, "DEL", "net2", conf(topo)))
        assert ns_state(topo.pod) == pod_before and ns_state(topo.node) == node_before
        assert "state" in points and any(p.startswith("node:") for p in points)
        for point in points:
            def fail_at(here, point=point):
                if here == point:
                    raise RuntimeError(f"injected fault at {here}")
            _faults.hook = fail_at
            outcome = serve_request(environ, stdin, node_netns_fd=node_fd)
            assert outcome.exit_code == 1, point
            assert ns_state(topo.pod) == pod_before, point
            assert ns_state(topo.node) == node_before, point
            assert not os.path.exists(os.path.join(topo.tmp, "state", "attachments", CID,
                                                   "net2.json")), point
    finally:
        _faults.hook = None
        os.close(node_fd)
    ok(run(topo, "CHECK", "net1", conf(topo, topo_prev(topo, 1))))
