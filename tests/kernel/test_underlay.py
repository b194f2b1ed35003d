"""Underlay and auto modes on a real kernel: the pod's eth0 is a macvlan on the underlay.

Topology (namespaces prefixed ``rtU``, removed afterwards):

    gw0 ns: 10.6.0.1/24 fd00:6::1/64 (the underlay's gateway; no route to anything else)
       | veth u0/gw
    node ns: u0 10.6.0.4/24 fd00:6::4/64 (the node's underlay address, eth0's macvlan master)
             lo 10.233.0.10 fd00:96::10 (a "service" address only the node has)
             o0 10.8.0.1/24 fd00:8::1/64 --- out ns: 10.8.0.2 fd00:8::2, default via the node
             rK (rail K) --- gwK ns: 172.16.1K.254/24 fd00:16:1K::254/64, lo 10.100.K.1
    pod ns: eth0 = macvlan on u0 (10.6.0.50/24 fd00:6::50/64, default via gw0)
            netK = macvlan on rK (172.16.1K.10/24 fd00:16:1K::10/64)

A macvlan cannot talk to its own master, so without route-tune the pod cannot reach its node,
and replies to the "outside" namespace (a NodePort client, forwarded by the node) would leave
through eth0 towards gw0, which cannot deliver them. route-tune runs as the installed
executable inside the node namespace, as a runtime runs it.
"""

from __future__ import annotations

import json
import os
import socket

import pytest

from harness.kernel import nsx, ok, pings, route_get, sh, table_of
from harness.topologies import (NODE_V4, NODE_V6, OUT_V4, OUT_V6, POD_V4, POD_V6, SVC_V4, SVC_V6,
                                 Underlay)
from harness.topologies import UNDERLAY_CID as CID
from harness.snapshot import ns_state

pytestmark = pytest.mark.netns
NODE_VETH = "rt" + CID[:11]


# -- observing ---------------------------------------------------------------------------------
def node_sysctls(ns: str) -> dict[str, str]:
    """Every per-interface IPv4/IPv6 sysctl of a namespace (path -> value)."""
    text = nsx(ns, "sh", "-c", "grep -r . /proc/sys/net/ipv4/conf /proc/sys/net/ipv6/conf "
               "2>/dev/null || true")
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line
                and "/stable_secret" not in line)


def link_txqlens(ns: str) -> dict[str, int]:
    return {link["ifname"]: link.get("txqlen") for link in
            json.loads(nsx(ns, "ip", "-j", "link", "show"))}


def without(values: dict, name: str) -> dict:
    """``values`` without the keys that belong to link ``name``."""
    return {k: v for k, v in values.items() if k != name and f"/{name}/" not in k}


def counters(ns: str, dev: str) -> tuple[int, int]:
    """(rx, tx) packets of ``dev`` in ``ns``."""
    stats = json.loads(nsx(ns, "ip", "-j", "-s", "link", "show", "dev", dev))[0]["stats64"]
    return stats["rx"]["packets"], stats["tx"]["packets"]


def tcp_roundtrip(server_ns: str, server_ip: str, client_ns: str, port: int = 8080) -> bool:
    """A TCP connection from ``client_ns`` to ``server_ip`` in ``server_ns``: handshake and one
    reply from the server (so SYN-ACK and data both have to find their way back)."""
    from cniplugin.kernel import netns as _netns
    family = socket.AF_INET6 if ":" in server_ip else socket.AF_INET
    fds = [_netns.open_netns(f"/var/run/netns/{ns}") for ns in (server_ns, client_ns)]
    try:
        with _netns.entered(fds[0]):
            server = socket.socket(family, socket.SOCK_STREAM)
        with _netns.entered(fds[1]):
            client = socket.socket(family, socket.SOCK_STREAM)
        with server, client:
            server.bind((server_ip, port))
            server.listen(1)
            client.settimeout(3)
            try:
                client.connect((server_ip, port))  # the kernel answers for the backlog
            except OSError:
                return False
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"route-tune")
                return client.recv(16) == b"route-tune"
    finally:
        for fd in fds:
            os.close(fd)


def families(topo: Underlay) -> list[int]:
    return [f for f, on in ((4, topo.v4), (6, topo.v6)) if on]


def ip(family: int, v4: str, v6: str) -> str:
    return v4 if family == 4 else v6


# -- tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("v4,v6", [(True, False), (False, True), (True, True)],
                         ids=["v4", "v6", "dual"])
def test_underlay_paths_and_clean_del(underlay_factory, v4, v6):
    topo = underlay_factory(v4=v4, v6=v6, rails=1)
    p, n, o = topo.pod, topo.node, topo.out
    pod_before, node_before = ns_state(p), ns_state(n)
    node_sysctls_before = node_sysctls(n)
    for fam in families(topo):  # the underlay problem: the pod cannot reach its node
        assert not pings(p, ip(fam, NODE_V4, NODE_V6), ip(fam, POD_V4, POD_V6), timeout=0.5)
    topo.add("eth0")
    topo.add("net1")
    assert json.loads(nsx(p, "ip", "-j", "link", "show", "veth0"))[0]["mtu"] == 1500
    node_link = json.loads(nsx(n, "ip", "-j", "-d", "link", "show", NODE_VETH))[0]
    assert node_link["ifalias"] == f"route-tune:{CID}" and "UP" in node_link["flags"]
    assert nsx(n, "sysctl", "-n", f"net.ipv6.conf.{NODE_VETH}.accept_ra").strip() == "0"
    assert without(node_sysctls(n), NODE_VETH) == node_sysctls_before, \
        "accept_ra=0 on the node end only: no other node sysctl changes"
    for fam in families(topo):
        pod_ip, node_ip = ip(fam, POD_V4, POD_V6), ip(fam, NODE_V4, NODE_V6)
        svc, out = ip(fam, SVC_V4, SVC_V6), ip(fam, OUT_V4, OUT_V6)
        rail = ip(fam, "172.16.11.10", "fd00:16:11::10")
        # The pod reaches the node and the service address through veth0.
        assert route_get(p, node_ip)["dev"] == "veth0"
        assert route_get(p, svc)["dev"] == "veth0"
        rx0, tx0 = counters(p, "veth0")
        assert pings(p, node_ip, pod_ip) and pings(p, svc, pod_ip)
        rx1, tx1 = counters(p, "veth0")
        assert tx1 - tx0 >= 2 and rx1 - rx0 >= 2
        # Node -> pod and outside -> node -> pod: the replies come back through veth0.
        _, node_tx0 = counters(n, NODE_VETH)
        node_rx0, _ = counters(n, NODE_VETH)
        assert pings(n, pod_ip, node_ip)
        assert pings(o, pod_ip, out), "NodePort-style reply must return through veth0"
        node_rx1, node_tx1 = counters(n, NODE_VETH)
        assert node_tx1 - node_tx0 >= 2 and node_rx1 - node_rx0 >= 2
        assert tcp_roundtrip(p, pod_ip, n) and tcp_roundtrip(p, pod_ip, o, 8081)
        # Rail traffic stays on the rail; cluster traffic from the rail address uses veth0.
        assert route_get(p, ip(fam, "8.8.8.8", "2001:db8::8"), rail)["dev"] == "net1"
        assert pings(p, ip(fam, "10.100.1.1", "fd00:100:1::1"), rail)
        assert route_get(p, svc, rail)["dev"] == "veth0"
        assert pings(n, rail, node_ip), "the node reaches the rail address through veth0"
        # eth0's own traffic: its table, its gateway.
        assert route_get(p, ip(fam, "8.8.8.8", "2001:db8::8"), pod_ip)["dev"] == "eth0"
    if v4:
        assert table_of(p, "8.8.8.8", POD_V4) == "101"
    for ifname in ("eth0", "net1"):
        ok(topo.run("CHECK", ifname, topo.conf(ifname)))
    steering = nsx(p, "nft", "list", "table", "inet", "route_tune")
    assert 'iifname "veth0" ct state new' in steering
    # Multus order: net1's DEL first must leave eth0's paths intact.
    topo.delete("net1")
    for fam in families(topo):
        pod_ip = ip(fam, POD_V4, POD_V6)
        assert pings(n, pod_ip, ip(fam, NODE_V4, NODE_V6))
        assert pings(o, pod_ip, ip(fam, OUT_V4, OUT_V6))
        assert pings(p, ip(fam, SVC_V4, SVC_V6), pod_ip)
    ok(topo.run("CHECK", "eth0", topo.conf("eth0")))
    topo.delete("eth0")
    assert ns_state(p) == pod_before
    assert ns_state(n) == node_before
    assert not os.listdir(os.path.join(topo.tmp, "state", "attachments"))


def test_reply_steering_is_what_brings_outside_replies_back(underlay_factory):
    topo = underlay_factory(rails=0)
    topo.add("eth0")
    assert pings(topo.out, POD_V4, OUT_V4)
    nsx(topo.pod, "ip", "rule", "del", "pref", "30000")
    assert not pings(topo.out, POD_V4, OUT_V4, timeout=0.5), "without the fwmark rule"
    assert pings(topo.node, POD_V4, NODE_V4), "node replies use the node-IP routes anyway"
    failed = topo.run("CHECK", "eth0", topo.conf("eth0"))
    assert failed.returncode == 1 and "fwmark 0x1/0x1" in json.loads(failed.stdout)["msg"]
    topo.add("eth0")  # a re-ADD repairs
    assert pings(topo.out, POD_V4, OUT_V4)
    nsx(topo.pod, "nft", "delete", "table", "inet", "route_tune")
    assert not pings(topo.out, POD_V4, OUT_V4, timeout=0.5), "without the nft table"
    assert "nft" in json.loads(topo.run("CHECK", "eth0", topo.conf("eth0")).stdout)["msg"]
    topo.add("eth0")
    assert pings(topo.out, POD_V4, OUT_V4)
    topo.delete("eth0")


def test_auto_resolution_and_missing_veth(underlay_factory):
    topo = underlay_factory(rails=2)
    # Explicit underlay on a later NIC before eth0 made veth0: code 105 naming the first step.
    done = topo.run("ADD", "net1", topo.conf("net1", mode="underlay"))
    reply = json.loads(done.stdout)
    assert done.returncode == 1 and reply["code"] == 105
    assert "must run on eth0" in reply["msg"] and "veth0" in reply["msg"]
    # auto on net1 without veth0 resolves to overlay, which needs an overlay eth0 (a veth).
    reply = json.loads(topo.run("ADD", "net1", topo.conf("net1")).stdout)
    assert reply["code"] == 102 and "overlay" in reply["msg"]
    # auto on eth0 -> underlay; then auto on net1 (veth0 exists) -> underlay.
    topo.add("eth0")
    topo.add("net1")
    state = json.loads(open(os.path.join(topo.tmp, "state", "attachments", CID,
                                         "net1.json")).read())
    assert state["desired"]["mode"] == "underlay" and state["desired"]["table"] == 102
    assert route_get(topo.pod, SVC_V4, "172.16.11.10")["dev"] == "veth0"
    # Explicit overlay in an underlay pod is refused (veth0 belongs to underlay mode).
    reply = json.loads(topo.run("ADD", "net2", topo.conf("net2", mode="overlay")).stdout)
    assert reply["code"] == 7 and "veth0" in reply["msg"]
    topo.delete("eth0")  # eth0 first (no Multus): net1's DEL still cleans up after it
    topo.delete("net1")
    assert "veth0" not in nsx(topo.pod, "ip", "link")


def test_readd_replaces_stale_neighbour_mac(underlay_factory):
    """#2464: a re-ADD replaces the node's PERMANENT neighbour with veth0's current MAC."""
    topo = underlay_factory(rails=0)
    topo.add("eth0")
    nsx(topo.pod, "ip", "link", "set", "veth0", "address", "02:00:00:00:00:99")
    assert not pings(topo.node, POD_V4, NODE_V4, timeout=0.5)
    topo.add("eth0")
    assert "lladdr 02:00:00:00:00:99 PERMANENT" in nsx(topo.node, "ip", "neigh", "show", POD_V4)
    assert pings(topo.node, POD_V4, NODE_V4)
    topo.delete("eth0")


def test_node_link_name_collision_fails_loudly_and_rolls_back(underlay_factory):
    """coordinator swallowed this error; route-tune reports it (103) and leaves no trace."""
    topo = underlay_factory(rails=0)
    nsx(topo.node, "ip", "link", "add", NODE_VETH, "type", "veth", "peer", "name", "rtUother")
    pod_before, node_before = ns_state(topo.pod), ns_state(topo.node)
    done = topo.run("ADD", "eth0", topo.conf("eth0"))
    reply = json.loads(done.stdout)
    assert done.returncode == 1 and reply["code"] == 103 and NODE_VETH in reply["msg"]
    assert ns_state(topo.pod) == pod_before and ns_state(topo.node) == node_before
    ok(topo.run("DEL", "eth0", topo.conf()))
    assert NODE_VETH in nsx(topo.node, "ip", "link"), "someone else's link is never deleted"


def test_options_tx_queue_len_mtu_link_address_policy_routes(underlay_factory):
    topo = underlay_factory(rails=1)
    pod_before, node_before = ns_state(topo.pod), ns_state(topo.node)
    node_links = link_txqlens(topo.node)
    keys = dict(txQueueLen=2000, vethMTU=1400, vethLinkAddress="169.254.100.1",
                policyRoutes=[{"dst": "10.100.1.1/32", "gw": "10.6.0.1"}])
    topo.add("eth0", **keys)
    link = json.loads(nsx(topo.pod, "ip", "-j", "addr", "show", "veth0"))[0]
    assert link["mtu"] == 1400 and link["addr_info"][0]["local"] == "169.254.100.1"
    assert json.loads(nsx(topo.pod, "ip", "-j", "link", "show", "eth0"))[0]["txqlen"] == 2000
    assert without(link_txqlens(topo.node), NODE_VETH) == node_links, \
        "txQueueLen applies to the pod's eth0, never to a node link (coordinator's defect)"
    assert json.loads(nsx(topo.node, "ip", "-j", "link", "show", NODE_VETH))[0]["mtu"] == 1400
    # policyRoutes: in main (eth0 is the default NIC) and in eth0's table.
    assert route_get(topo.pod, "10.100.1.1")["gateway"] == "10.6.0.1"
    assert route_get(topo.pod, "10.100.1.1", POD_V4)["gateway"] == "10.6.0.1"
    topo.add("net1", podDefaultRouteNic="net1")
    assert route_get(topo.pod, "8.8.8.8")["dev"] == "net1"
    assert route_get(topo.pod, "8.8.8.8", POD_V4)["dev"] == "eth0", "eth0 replies stay on eth0"
    assert pings(topo.out, POD_V4, OUT_V4)
    topo.delete("net1", podDefaultRouteNic="net1")
    assert route_get(topo.pod, "8.8.8.8")["dev"] == "eth0"
    topo.delete("eth0", **keys)
    assert ns_state(topo.pod) == pod_before and ns_state(topo.node) == node_before


def test_del_without_pod_netns_removes_the_node_end(underlay_factory):
    topo = underlay_factory(rails=1)
    node_before = ns_state(topo.node)
    topo.add("eth0")
    topo.add("net1")
    ok(topo.run("DEL", "net1", topo.conf(), netns=""))
    ok(topo.run("DEL", "eth0", topo.conf(), netns=""))  # runtime lost the netns path
    assert NODE_VETH not in nsx(topo.node, "ip", "link")
    assert ns_state(topo.node) == node_before
    assert not os.listdir(os.path.join(topo.tmp, "state", "attachments"))


@pytest.mark.parametrize("action", ["raise", "kill"])
def test_fault_at_every_point(underlay_factory, action):
    """ROUTE_TUNE_FAULT_*: count a clean underlay ADD's fault points, then stop ADD at each.
    raise: the rollback leaves pod, node and state exactly as before. kill (a crash, nothing
    rolls back): DEL from the write-ahead state restores exactly the state before ADD."""
    topo = underlay_factory(rails=0)
    pod_before, node_before = ns_state(topo.pod), ns_state(topo.node)
    log = os.path.join(topo.tmp, "points.log")
    ok(topo.run("ADD", "eth0", topo.conf("eth0"), extra_env={"ROUTE_TUNE_FAULT_LOG": log}))
    ok(topo.run("DEL", "eth0", topo.conf(), extra_env={"ROUTE_TUNE_FAULT_LOG": log + ".del"}))
    points = open(log).read().splitlines()
    assert points[:2] == ["state", "state:written"] and points[-1] == "state:applied"
    assert any(p.startswith("pod:ip link add veth0") for p in points)
    assert any(p.startswith("node:") for p in points) and len(points) > 15
    assert any(p.startswith("del:pod:") for p in open(log + ".del").read().splitlines())
    state_file = os.path.join(topo.tmp, "state", "attachments", CID, "eth0.json")
    for n, point in enumerate(points, start=1):
        env = {"ROUTE_TUNE_FAULT_AT": str(n), "ROUTE_TUNE_FAULT_ACTION": action}
        done = topo.run("ADD", "eth0", topo.conf("eth0"), extra_env=env)
        if action == "raise":
            assert done.returncode == 1 and b"injected fault" in done.stdout, point
            assert not os.path.exists(state_file), point
        else:
            assert done.returncode in (-9, 137), (point, done.returncode, done.stdout)
            assert os.path.exists(state_file) or point == "state", point
            ok(topo.run("DEL", "eth0", topo.conf()))
        assert ns_state(topo.pod) == pod_before, point
        assert ns_state(topo.node) == node_before, point


def test_del_matrix(underlay_factory):
    """DEL with no ADD, twice, without prevResult, and after the pod netns is gone."""
    topo = underlay_factory(v4=True, v6=True, rails=1)
    node_before = ns_state(topo.node)
    ok(topo.run("DEL", "eth0", topo.conf()))                     # never added
    topo.add("eth0")
    topo.add("net1")
    sh("ip", "netns", "del", topo.pod)                            # the runtime destroyed it
    topo.created.remove(topo.pod)
    for ifname in ("net1", "eth0"):
        ok(topo.run("DEL", ifname, topo.conf()))
        ok(topo.run("DEL", ifname, topo.conf()))
    # The pair died with the pod's netns; the node rule went with the last attachment.
    assert ns_state(topo.node) == node_before
    assert not os.listdir(os.path.join(topo.tmp, "state", "attachments"))
