"""The kernel suites' small topologies, each a ``NetnsGroup`` named by a harness tag (built by
the ``netns_group`` fixture, so ``harness.lab.NAMES`` names them and ``lab_session`` removes
leftovers):

- ``CalicoRails``: a Calico-style pod eth0 plus macvlan rails, each rail its own gateway
  namespace (the engine suite).
- ``Underlay``: the pod's eth0 a macvlan on the node's underlay (the underlay/auto suite).
- ``Fabric``: rails that share one subnet, on one segment or on one segment each.

route-tune runs as the installed executable inside the node namespace, as a runtime runs it
(``NetnsGroup.run``, through ``harness.host.run_plugin``).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field

from harness.host import run_plugin
from harness.kernel import nsx, ok, sh

CALICO_MAC = "ee:ee:ee:ee:ee:ee"

class NetnsGroup:
    """Namespace bookkeeping of a small kernel-suite topology named by ``tag`` (a dataclass
    with ``tag`` and ``created`` fields): node ``<tag>n``, pod ``<tag>p``; ``add_ns`` creates one
    (no DAD, so link-locals never turn valid between two snapshots; lo up), ``cleanup`` deletes
    every namespace it created."""

    tag: str
    created: list[str]
    tmp: str
    cid: str  # CNI_CONTAINERID of the topology's pod (a class attribute of the subclass)

    node = property(lambda self: f"{self.tag}n")
    pod = property(lambda self: f"{self.tag}p")

    no_dad = True  # a class attribute: Fabric keeps DAD

    def add_ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.created.append(name)
        if self.no_dad:
            nsx(name, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0")
        nsx(name, "ip", "link", "set", "lo", "up")

    def cleanup(self) -> None:
        for name in reversed(self.created):
            sh("ip", "netns", "del", name, check=False)

    def run(self, command: str, ifname: str, config: dict, netns: str | None = None,
            extra_env: dict | None = None) -> subprocess.CompletedProcess:
        """The installed route-tune in the node netns, as a runtime calls it (state under ``tmp``)."""
        defaults = os.path.join(self.tmp, f"{self.tag}-defaults.json")
        with open(defaults, "w") as f:
            json.dump({"stateDir": os.path.join(self.tmp, "state"),
                       "logDir": os.path.join(self.tmp, "log")}, f)
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": self.cid, "CNI_IFNAME": ifname,
               "CNI_NETNS": f"/var/run/netns/{self.pod}" if netns is None else netns,
               "CNI_PATH": "/usr/lib/cni", "ROUTE_TUNE_DEFAULTS": defaults, **(extra_env or {})}
        return run_plugin(env, config, netns=self.node)


def calico_eth0(group: NetnsGroup, uplink: str, cali: str) -> None:
    """A forwarding node with uplink veth ``uplink``0/1 (10.1.20.4/24, fd00:1:20::4/64) and a
    Calico-style pod eth0 (10.233.119.164/32, fd00:233::164/128) whose node end ``cali`` does
    proxy ARP for 169.254.1.1."""
    n, p = group.node, group.pod
    nsx(n, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
    nsx(n, "ip", "link", "add", f"{uplink}0", "type", "veth", "peer", "name", f"{uplink}1")
    for link in (f"{uplink}0", f"{uplink}1"):
        nsx(n, "ip", "link", "set", link, "up")
    nsx(n, "ip", "addr", "add", "10.1.20.4/24", "dev", f"{uplink}0")
    nsx(n, "ip", "addr", "add", "fd00:1:20::4/64", "dev", f"{uplink}0", "nodad")
    nsx(n, "ip", "link", "add", cali, "address", CALICO_MAC, "type", "veth", "peer", "name",
        "eth0", "netns", p)
    nsx(n, "ip", "link", "set", cali, "up")
    nsx(n, "sysctl", "-qw", f"net.ipv4.conf.{cali}.proxy_arp=1")
    nsx(p, "ip", "link", "set", "eth0", "up")
    nsx(p, "ip", "addr", "add", "10.233.119.164/32", "dev", "eth0")
    nsx(p, "ip", "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
    nsx(p, "ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
    nsx(p, "ip", "addr", "add", "fd00:233::164/128", "dev", "eth0", "nodad")
    nsx(p, "ip", "-6", "route", "add", "default", "via", "fe80::ecee:eeff:feee:eeee",
        "dev", "eth0")
    nsx(n, "ip", "route", "add", "10.233.119.164/32", "dev", cali)
    nsx(n, "ip", "-6", "route", "add", "fd00:233::164/128", "dev", cali)


# -- the engine suite's pod: Calico eth0 + rails, each behind its own gateway -----------------
CALICO_CID = "c0ffee" * 4

@dataclass
class CalicoRails(NetnsGroup):
    cid = CALICO_CID
    tag: str
    rails: int
    v4: bool = True
    v6: bool = False
    tmp: str = ""
    created: list[str] = field(default_factory=list)

    def gw(self, k: int) -> str:
        return f"{self.tag}g{k}"

    def build(self) -> None:
        self.add_ns(self.node)
        self.add_ns(self.pod)
        calico_eth0(self, "rtBup", "rtBcali0")
        for k in range(1, self.rails + 1):
            self.add_rail(k)

    def add_rail(self, k: int) -> None:
        g, n = self.gw(k), self.node
        self.add_ns(g)
        nsx(n, "ip", "link", "add", f"rtBr{k}", "type", "veth", "peer", "name", "gw", "netns", g)
        nsx(n, "ip", "link", "set", f"rtBr{k}", "up")
        nsx(g, "ip", "link", "set", "gw", "up")
        nsx(g, "ip", "addr", "add", f"172.16.1{k}.254/24", "dev", "gw")
        nsx(g, "ip", "addr", "add", f"fd00:16:1{k}::254/64", "dev", "gw", "nodad")
        nsx(g, "ip", "addr", "add", f"10.100.{k}.1/32", "dev", "lo")
        nsx(g, "ip", "addr", "add", f"fd00:100:{k}::1/128", "dev", "lo")

    def attach(self, k: int, ifname: str = "") -> dict:
        """What macvlan + host-local do: the link with its addresses; returns the prevResult."""
        ifname = ifname or f"net{k}"
        n, p = self.node, self.pod
        nsx(n, "ip", "link", "add", ifname, "link", f"rtBr{k}", "type", "macvlan", "mode",
            "bridge")
        nsx(n, "ip", "link", "set", ifname, "netns", p)
        ips = []
        if self.v4:
            nsx(p, "ip", "addr", "add", f"172.16.1{k}.10/24", "dev", ifname)
            ips.append({"address": f"172.16.1{k}.10/24", "gateway": f"172.16.1{k}.254",
                        "interface": 0})
        if self.v6:
            nsx(p, "ip", "addr", "add", f"fd00:16:1{k}::10/64", "dev", ifname, "nodad")
            ips.append({"address": f"fd00:16:1{k}::10/64", "gateway": f"fd00:16:1{k}::254",
                        "interface": 0})
        nsx(p, "ip", "link", "set", ifname, "up")
        mac = json.loads(nsx(p, "ip", "-j", "link", "show", ifname))[0]["address"]
        return {"cniVersion": "1.0.0", "ips": ips, "dns": {},
                "interfaces": [{"name": ifname, "mac": mac,
                                "sandbox": f"/var/run/netns/{p}"}]}


# -- the underlay suite's pod: eth0 a macvlan on the node's underlay --------------------------
UNDERLAY_CID = "5ca1ab1e" * 8
POD_V4, POD_V6 = "10.6.0.50", "fd00:6::50"
NODE_V4, NODE_V6 = "10.6.0.4", "fd00:6::4"
SVC_V4, SVC_V6 = "10.233.0.10", "fd00:96::10"
OUT_V4, OUT_V6 = "10.8.0.2", "fd00:8::2"

@dataclass
class Underlay(NetnsGroup):
    cid = UNDERLAY_CID
    tag: str
    v4: bool = True
    v6: bool = False
    rails: int = 1
    tmp: str = ""
    created: list[str] = field(default_factory=list)

    @property
    def out(self) -> str:
        return f"{self.tag}o"

    def addr(self, ns: str, dev: str, v4: str, v6: str) -> None:
        if self.v4:
            nsx(ns, "ip", "addr", "add", v4, "dev", dev)
        if self.v6:
            nsx(ns, "ip", "addr", "add", v6, "dev", dev, "nodad")

    def veth(self, ns: str, name: str, peer_ns: str, peer: str) -> None:
        nsx(ns, "ip", "link", "add", name, "type", "veth", "peer", "name", peer, "netns", peer_ns)
        nsx(ns, "ip", "link", "set", name, "up")
        nsx(peer_ns, "ip", "link", "set", peer, "up")

    def build(self) -> None:
        n, p, o, g = self.node, self.pod, self.out, f"{self.tag}g0"
        for ns in (n, p, o, g):
            self.add_ns(ns)
        for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
            nsx(n, "sysctl", "-qw", key)
        self.veth(n, "u0", g, "gw")
        self.addr(n, "u0", f"{NODE_V4}/24", f"{NODE_V6}/64")
        self.addr(g, "gw", "10.6.0.1/24", "fd00:6::1/64")
        self.addr(n, "lo", f"{SVC_V4}/32", f"{SVC_V6}/128")
        self.veth(n, "o0", o, "eth0")
        self.addr(n, "o0", "10.8.0.1/24", "fd00:8::1/64")
        self.addr(o, "eth0", f"{OUT_V4}/24", f"{OUT_V6}/64")
        if self.v4:
            nsx(o, "ip", "route", "add", "default", "via", "10.8.0.1")
        if self.v6:
            nsx(o, "ip", "-6", "route", "add", "default", "via", "fd00:8::1")
        # eth0: what macvlan + IPAM do for the pod's default network.
        nsx(n, "ip", "link", "add", "eth0", "link", "u0", "type", "macvlan", "mode", "bridge")
        nsx(n, "ip", "link", "set", "eth0", "netns", p)
        self.addr(p, "eth0", f"{POD_V4}/24", f"{POD_V6}/64")
        nsx(p, "ip", "link", "set", "eth0", "up")
        if self.v4:
            nsx(p, "ip", "route", "add", "default", "via", "10.6.0.1", "dev", "eth0")
        if self.v6:
            nsx(p, "ip", "-6", "route", "add", "default", "via", "fd00:6::1", "dev", "eth0")
        for k in range(1, self.rails + 1):
            gk = f"{self.tag}g{k}"
            self.add_ns(gk)
            self.veth(n, f"r{k}", gk, "gw")
            self.addr(gk, "gw", f"172.16.1{k}.254/24", f"fd00:16:1{k}::254/64")
            self.addr(gk, "lo", f"10.100.{k}.1/32", f"fd00:100:{k}::1/128")
            nsx(n, "ip", "link", "add", f"net{k}", "link", f"r{k}", "type", "macvlan", "mode",
                "bridge")
            nsx(n, "ip", "link", "set", f"net{k}", "netns", p)
            self.addr(p, f"net{k}", f"172.16.1{k}.10/24", f"fd00:16:1{k}::10/64")
            nsx(p, "ip", "link", "set", f"net{k}", "up")

    def prev(self, ifname: str) -> dict:
        ips = []
        k = int(ifname[3:]) if ifname.startswith("net") else 0
        if self.v4:
            ips.append({"address": f"{POD_V4}/24", "gateway": "10.6.0.1"} if not k else
                       {"address": f"172.16.1{k}.10/24", "gateway": f"172.16.1{k}.254"})
        if self.v6:
            ips.append({"address": f"{POD_V6}/64", "gateway": "fd00:6::1"} if not k else
                       {"address": f"fd00:16:1{k}::10/64", "gateway": f"fd00:16:1{k}::254"})
        for ip in ips:
            ip["interface"] = 0
        return {"cniVersion": "1.0.0", "ips": ips,
                "interfaces": [{"name": ifname, "sandbox": f"/var/run/netns/{self.pod}"}]}

    def conf(self, ifname: str | None = None, **keys) -> dict:
        config = {"cniVersion": "1.0.0", "name": "underlay" if ifname in (None, "eth0") else
                  "rail", "type": "route-tune", "mode": "auto",
                  "overlayPodCIDR": ["10.233.64.0/18"], "serviceCIDR": ["10.233.0.0/18"],
                  **keys}
        if self.v6:
            config["serviceCIDR"] = [*config["serviceCIDR"], "fd00:96::/112"]
        if ifname is not None:
            config["prevResult"] = self.prev(ifname)
        return config

    def add(self, ifname: str, **keys) -> dict:
        return ok(self.run("ADD", ifname, self.conf(ifname, **keys)))

    def delete(self, ifname: str, **keys) -> None:
        ok(self.run("DEL", ifname, self.conf(None, **keys)))


# -- the shared-subnet suite's fabric -------------------------------------------------------
FABRIC_CID = "5ba4ed" * 4
GW = {4: "172.16.0.1", 6: "fd00:16::1"}
SUBNET_PEER = {4: "172.16.0.200", 6: "fd00:16::200"}
REMOTE = {4: "198.18.0.1", 6: "fd00:198:18::1"}
PLEN = {4: 16, 6: 64}


def fabric_ip(k: int, family: int) -> str:
    """Pod netK's address in the one shared subnet."""
    return f"172.16.0.1{k}" if family == 4 else f"fd00:16::1{k}"


@dataclass
class Fabric(NetnsGroup):
    """``layout`` segments: each rail its own L2 segment (peer ns ``<tag>sK``), every segment
    the same subnet; flat: every rail on ONE segment (``<tag>s0``). DAD stays on (a test
    turns it on for the rails' addresses)."""

    cid = FABRIC_CID
    no_dad = False
    tag: str
    layout: str = "segments"
    rails: int = 1
    families: tuple[int, ...] = (4,)
    tmp: str = ""
    created: list[str] = field(default_factory=list)

    def peer(self, k: int) -> str:
        """The peer namespace on rail k's segment (flat: the one shared segment)."""
        return f"{self.tag}s{k if self.layout == 'segments' else 0}"

    def lower(self, k: int) -> str:
        return f"{self.tag}r{k if self.layout == 'segments' else 0}"

    def build(self) -> None:
        n, p = self.node, self.pod
        self.add_ns(n)
        self.add_ns(p)
        calico_eth0(self, "up", "cali0")
        for k in sorted({int(self.peer(k)[-1]) for k in range(1, self.rails + 1)}):
            self._segment(k)

    def _segment(self, k: int) -> None:
        s, n = f"{self.tag}s{k}", self.node
        self.add_ns(s)
        nsx(n, "ip", "link", "add", f"{self.tag}r{k}", "type", "veth", "peer", "name", "seg",
            "netns", s)
        nsx(n, "ip", "link", "set", f"{self.tag}r{k}", "up")
        nsx(s, "ip", "link", "set", "seg", "up")
        for fam in (4, 6):
            extra = ("nodad",) if fam == 6 else ()
            for ip in (GW[fam], SUBNET_PEER[fam]):
                nsx(s, "ip", "addr", "add", f"{ip}/{PLEN[fam]}", "dev", "seg", *extra)
            nsx(s, "ip", "addr", "add", REMOTE[fam], "dev", "lo", *extra)

    def attach(self, k: int, dad: bool = False) -> dict:
        """What macvlan + IPAM do for netK; returns its prevResult."""
        ifname, n, p = f"net{k}", self.node, self.pod
        nsx(n, "ip", "link", "add", ifname, "link", self.lower(k), "type", "macvlan", "mode",
            "bridge")
        nsx(n, "ip", "link", "set", ifname, "netns", p)
        ips = []
        for fam in self.families:
            extra = ("nodad",) if fam == 6 and not dad else ()
            nsx(p, "ip", "addr", "add", f"{fabric_ip(k, fam)}/{PLEN[fam]}", "dev", ifname, *extra)
            ips.append({"address": f"{fabric_ip(k, fam)}/{PLEN[fam]}", "gateway": GW[fam],
                        "interface": 0})
        nsx(p, "ip", "link", "set", ifname, "up")
        return {"cniVersion": "1.0.0", "ips": ips, "dns": {},
                "interfaces": [{"name": ifname, "mac": self.mac(k),
                                "sandbox": f"/var/run/netns/{p}"}]}

    def mac(self, k: int) -> str:
        return json.loads(nsx(self.pod, "ip", "-j", "link", "show", f"net{k}"))[0]["address"]

    def run(self, command: str, k: int, prev: dict, **keys) -> subprocess.CompletedProcess:  # type: ignore[override]
        config = {"cniVersion": "1.0.0", "name": "rail", "type": "route-tune",
                  "overlayPodCIDR": ["10.233.64.0/18"],
                  "serviceCIDR": ["10.233.0.0/18", "fd00:96::/112"],
                  "hijackCIDR": ["169.254.0.0/16"], "prevResult": prev, **keys}
        return NetnsGroup.run(self, command, f"net{k}", config)

    def ok(self, command: str, k: int, prev: dict, **keys) -> None:
        done = self.run(command, k, prev, **keys)
        assert done.returncode == 0, (command, k, done.stdout, done.stderr)


