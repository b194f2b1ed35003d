"""The two-node (N-node) lab: Calico-style cluster network per node plus a rail-optimised fabric.

Every node gets the one-node lab's shape (uplink, a pod with eth0, rails `rail1..railK` as veths),
and the rails meet in a fabric: rail K of every node is a port of leaf K's bridge (one L2
segment per rail, gateway `.254` on the bridge), and every leaf routes to a spine, so traffic
between different rails is routed while the same rail is switched.  docs/lab.md draws it.

Numbering (node i = 1..N, rail k = 1..8; `layout="shared"` keeps the addresses and widens the
prefix to one subnet for all rails, as docs/routing.md's shared-subnet layout):

    node i uplink        10.1.20.(3+i)/24             fd00:10:1:20::(3+i)/64   (cluster LAN bridge .1)
    overlay pod i eth0   10.233.(118+i).164/32        fd00:10:233::(i-1):a4/128
      node i's block     10.233.(118+i).128/26        fd00:10:233::(i-1):80/122 (routed via node i)
    underlay pod i eth0  10.6.0.(49+i)/24 gw 10.6.0.1 fd00:6::(49+i)/64 gw fd00:6::1
    service VIP          10.233.0.10 on every node's lo   fd00:10:96::a
    pod i netK           172.16.1K.(9+i)/24           fd00:16:1K::(9+i)/64      (shared: /16, fd00:16::1K:(9+i)/64)
    rail K gateway       172.16.1K.254 on leaf K      fd00:16:1K::254           (shared: fd00:16::1K:254)
    leaf K - spine       10.254.K.2 - 10.254.K.1      fd00:254:K::2 - ::1

Like the one-node lab it only creates and deletes namespaces named `<prefix>-...` and drives
`ip` through subprocesses (no pyroute2).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .runtime import Libcni, PluginEnv, PyRuntime, RailPod, cluster_defaults
from .topology import (CALI_LL6, CALI_MAC, FAMILIES, HIJACK_GW4, LabError, NetnsTools,
                       ip_batch, one_address_ranges)

MODES = ("overlay", "underlay")
LAYOUTS = ("separate", "shared")
#: Node-side name of pod eth0's veth (overlay); every node is its own netns, so one name serves.
HOST_PEER = "calipod"
SERVICE_VIP = {"4": "10.233.0.10", "6": "fd00:10:96::a"}
UNDERLAY_GW = {"4": "10.6.0.1", "6": "fd00:6::1"}


def _plen(fam: str, layout: str) -> int:
    if fam == "4":
        return 16 if layout == "shared" else 24
    return 64


@dataclass
class FabricLab(NetnsTools):
    """Context manager building `nodes` nodes, their pods' eth0 (overlay) and the rail fabric.

    `prefix` names the namespaces: `<prefix>-n<i>` (node), `-p<i>` (pod), `-l<k>` (leaf),
    `-spine`, `-lan` (the cluster network's switch and router).  In underlay mode the pods'
    eth0 is not built here: `FabricPods` ADDs it through libcni (macvlan on the node's uplink).
    """

    prefix: str
    nodes: int = 2
    rails: int = 8
    family: str = "4"
    mode: str = "overlay"
    layout: str = "separate"
    tmp: Path = field(init=False)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be 4, 6 or dual, not {self.family!r}")
        if self.mode not in MODES or self.layout not in LAYOUTS:
            raise ValueError(f"mode must be one of {MODES}, layout one of {LAYOUTS}")
        if not 1 <= self.rails <= 9 or not 1 <= self.nodes <= 9:
            raise ValueError("rails and nodes must be 1..9 (rail K uses 172.16.1K.0/24)")

    # -- names -------------------------------------------------------------------------------
    def node(self, i: int) -> str:
        return f"{self.prefix}-n{i}"

    def pod(self, i: int) -> str:
        return f"{self.prefix}-p{i}"

    def pod_netns(self, i: int) -> str:
        return f"/run/netns/{self.pod(i)}"

    def leaf(self, k: int) -> str:
        return f"{self.prefix}-l{k}"

    spine = property(lambda self: f"{self.prefix}-spine", doc="the spine router's netns")
    lan = property(lambda self: f"{self.prefix}-lan", doc="the cluster network's switch + router")

    @property
    def node_ids(self) -> range:
        return range(1, self.nodes + 1)

    @property
    def rail_ids(self) -> range:
        return range(1, self.rails + 1)

    @property
    def namespaces(self) -> list[str]:
        return ([self.lan, self.spine] + [self.node(i) for i in self.node_ids]
                + [self.pod(i) for i in self.node_ids] + [self.leaf(k) for k in self.rail_ids])

    def view(self, i: int) -> FabricNode:
        """Node i as `RailPod` sees a lab."""
        return FabricNode(self, i)

    # -- addresses ---------------------------------------------------------------------------
    def node_ip(self, i: int, fam: str) -> str:
        return f"10.1.20.{3 + i}" if fam == "4" else f"fd00:10:1:20::{3 + i}"

    def pod_ip(self, i: int, fam: str) -> str:
        """Pod i's eth0 address (overlay: Calico's /32; underlay: on the underlay subnet)."""
        if self.mode == "underlay":
            return f"10.6.0.{49 + i}" if fam == "4" else f"fd00:6::{49 + i}"
        return f"10.233.{118 + i}.164" if fam == "4" else f"fd00:10:233::{i - 1}:a4"

    def pod_block(self, i: int, fam: str) -> str:
        """Node i's overlay pod block (Calico's per-node IPAM block)."""
        return f"10.233.{118 + i}.128/26" if fam == "4" else f"fd00:10:233::{i - 1}:80/122"

    def service_ip(self, fam: str) -> str:
        return SERVICE_VIP[fam]

    def rail_ip(self, i: int, k: int, fam: str) -> str:
        """Pod i's netK address (host-local hands out exactly this one)."""
        return self._rail_addr(k, fam, str(9 + i))

    def gw_ip(self, k: int, fam: str) -> str:
        return self._rail_addr(k, fam, "254")

    def rail_prefix(self, fam: str) -> int:
        return _plen(fam, self.layout)

    def _rail_addr(self, k: int, fam: str, host: str) -> str:
        if fam == "4":
            return f"172.16.1{k}.{host}"
        return f"fd00:16::1{k}:{host}" if self.layout == "shared" else f"fd00:16:1{k}::{host}"

    def rail_subnet(self, k: int, fam: str) -> str:
        """The subnet pod netK is configured with (shared layout: the same for every rail)."""
        if self.layout == "shared":
            return "172.16.0.0/16" if fam == "4" else "fd00:16::/64"
        return f"172.16.1{k}.0/24" if fam == "4" else f"fd00:16:1{k}::/64"

    def rail_block(self, k: int, fam: str) -> str:
        """What the spine routes to leaf K (rail K's addresses, whatever the layout)."""
        if fam == "4":
            return f"172.16.1{k}.0/24"
        return f"fd00:16::1{k}:0/112" if self.layout == "shared" else f"fd00:16:1{k}::/64"

    def rail_ranges(self, i: int, k: int) -> list[list[dict]]:
        return one_address_ranges((self.rail_subnet(k, fam), self.rail_ip(i, k, fam), self.gw_ip(k, fam))
                                  for fam in self.families)

    def node_defaults(self) -> dict[str, list[str]]:
        """Every node's route-tune defaults: the lab's cluster CIDRs, and the node network as a
        hijack CIDR (coordinator's hijackCustomCIDR) so traffic to other nodes keeps the cluster path."""
        out = cluster_defaults(self.family)
        out["hijackCIDR"] = out["hijackCIDR"] + [{"4": "10.1.20.0/24", "6": "fd00:10:1:20::/64"}[f]
                                                 for f in self.families]
        return out

    # -- building --------------------------------------------------------------------------
    def _build(self) -> None:
        ip_batch([f"netns add {n}" for n in self.namespaces])
        forwarders = {self.lan, self.spine, *(self.node(i) for i in self.node_ids),
                      *(self.leaf(k) for k in self.rail_ids)}
        # No DAD (addresses are unique by construction; tentative ones make probes flaky), set
        # before any link exists so the macvlans the plugins create inherit it too.
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda ns: self._sysctls(ns, {
                "net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0,
                **({"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1}
                   if ns in forwarders else {})}), self.namespaces))
        jobs = [(self.lan, self._lan_lines()), (self.spine, self._spine_lines())]
        jobs += [(self.node(i), self._node_lines(i)) for i in self.node_ids]
        # Links are created from the node/spine side (their peers land in leaves, pods, lan),
        # so those batches run first; the far ends are configured after.
        with ThreadPoolExecutor(8) as pool:
            for fut in [pool.submit(ip_batch, lines, ns) for ns, lines in jobs]:
                fut.result()
        jobs = [(self.leaf(k), self._leaf_lines(k)) for k in self.rail_ids]
        jobs += [(self.pod(i), self._pod_lines(i)) for i in self.node_ids]
        jobs += [(self.lan, self._lan_ports())]
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ip_batch, lines, ns) for ns, lines in jobs]
            futures += [pool.submit(self._sysctls, self.node(i), self._node_sysctls()) for i in self.node_ids]
            for fut in futures:
                fut.result()
        self._wait_link_locals()
        if self.layout == "shared":
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda k: self._sysctls(self.leaf(k), {
                    "net.ipv4.conf.seg.proxy_arp": 1, "net.ipv4.neigh.seg.proxy_delay": 0,
                    "net.ipv6.conf.seg.proxy_ndp": 1, "net.ipv6.neigh.seg.proxy_delay": 0}), self.rail_ids))

    def _wait_link_locals(self, timeout: float = 30.0) -> None:
        """Until every link with carrier has its IPv6 link-local address: the kernel adds them
        after the link comes up, and a snapshot taken before would differ from any later one."""
        def settled(ns: str) -> bool:
            return all(any(a.get("family") == "inet6" and a.get("scope") == "link"
                           for a in link.get("addr_info", []))
                       for link in json.loads(self.ip(ns, "-j", "addr", "show"))
                       if "LOWER_UP" in link.get("flags", []) and "LOOPBACK" not in link.get("flags", []))
        deadline = time.monotonic() + timeout
        pending = list(self.namespaces)
        while pending:
            pending = [ns for ns in pending if not settled(ns)]
            if pending and time.monotonic() > deadline:
                raise LabError(f"IPv6 link-local addresses still missing in {pending} after {timeout:g} s")
            time.sleep(0.02 if pending else 0)

    def _node_sysctls(self) -> dict[str, str | int]:
        if self.mode == "underlay":
            return {}
        return {f"net.ipv4.conf.{HOST_PEER}.proxy_arp": 1, f"net.ipv4.neigh.{HOST_PEER}.proxy_delay": 0,
                f"net.ipv6.conf.{HOST_PEER}.proxy_ndp": 1}

    def _lan_lines(self) -> list[str]:
        lines = ["link set lo up", "link add lan type bridge mcast_snooping 0", "link set lan up"]
        lines += [f"addr add {a} dev lan" for a in self._by_family("10.1.20.1/24", "fd00:10:1:20::1/64")]
        if self.mode == "underlay":
            lines += [f"addr add {a} dev lan" for a in self._by_family("10.6.0.1/24", "fd00:6::1/64")]
        return lines

    def _lan_ports(self) -> list[str]:
        return [line for i in self.node_ids for line in (f"link set n{i} master lan", f"link set n{i} up")]

    def _spine_lines(self) -> list[str]:
        lines = ["link set lo up"]
        for k in self.rail_ids:
            lines += [f"link add leaf{k} type veth peer name tospine netns {self.leaf(k)}", f"link set leaf{k} up"]
            for fam in self.families:
                near = f"10.254.{k}.1/24" if fam == "4" else f"fd00:254:{k}::1/64"
                via = f"10.254.{k}.2" if fam == "4" else f"fd00:254:{k}::2"
                lines += [f"addr add {near} dev leaf{k}", f"route add {self.rail_block(k, fam)} via {via}"]
        return lines

    def _leaf_lines(self, k: int) -> list[str]:
        lines = ["link set lo up", "link add seg type bridge mcast_snooping 0", "link set seg up",
                 "link set tospine up"]
        lines += [line for i in self.node_ids for line in (f"link set n{i} master seg", f"link set n{i} up")]
        for fam in self.families:
            lines += [f"addr add {self.gw_ip(k, fam)}/{self.rail_prefix(fam)} dev seg",
                      f"addr add {f'10.254.{k}.2/24' if fam == '4' else f'fd00:254:{k}::2/64'} dev tospine",
                      f"route add default via {f'10.254.{k}.1' if fam == '4' else f'fd00:254:{k}::1'}"]
            if self.layout == "shared":
                # One subnet for all rails: the leaf switches only its own rail's addresses
                # (the more specific route) and answers ARP/NDP for the others, which it routes.
                spine = f"10.254.{k}.1" if fam == "4" else f"fd00:254:{k}::1"
                lines.append(f"route add {self.rail_block(k, fam)} dev seg")
                lines += [f"route add {self.rail_block(j, fam)} via {spine}" for j in self.rail_ids if j != k]
                if fam == "6":
                    lines += [f"neigh add proxy {self.rail_ip(i, j, fam)} dev seg" for j in self.rail_ids
                              if j != k for i in self.node_ids]
                    lines += [f"neigh add proxy {self.gw_ip(j, fam)} dev seg" for j in self.rail_ids if j != k]
        return lines

    def _node_lines(self, i: int) -> list[str]:
        lines = ["link set lo up", f"link add uplink type veth peer name n{i} netns {self.lan}", "link set uplink up"]
        lines += [f"addr add {self.service_ip(f)}/{32 if f == '4' else 128} dev lo" for f in self.families]
        for k in self.rail_ids:
            lines += [f"link add rail{k} type veth peer name n{i} netns {self.leaf(k)}", f"link set rail{k} up"]
        for fam in self.families:
            plen = 24 if fam == "4" else 64
            lines += [f"addr add {self.node_ip(i, fam)}/{plen} dev uplink",
                      f"route add default via {'10.1.20.1' if fam == '4' else 'fd00:10:1:20::1'} dev uplink"]
        if self.mode == "overlay":
            lines += [f"link add {HOST_PEER} address {CALI_MAC} type veth peer name eth0 netns {self.pod(i)}",
                      f"link set {HOST_PEER} up"]
            for fam in self.families:
                host = 32 if fam == "4" else 128
                lines += [f"route add {self.pod_ip(i, fam)}/{host} dev {HOST_PEER}"
                          + (" scope link" if fam == "4" else ""),
                          f"route add blackhole {self.pod_block(i, fam)}"]
                # Calico without encapsulation: BGP routes to the other nodes' blocks.
                lines += [f"route add {self.pod_block(j, fam)} via {self.node_ip(j, fam)} dev uplink"
                          for j in self.node_ids if j != i]
        return lines

    def _pod_lines(self, i: int) -> list[str]:
        lines = ["link set lo up"]
        if self.mode == "underlay":
            return lines
        lines.append("link set eth0 up")
        if "4" in self.families:
            lines += [f"addr add {self.pod_ip(i, '4')}/32 dev eth0", f"route add {HIJACK_GW4} dev eth0 scope link",
                      f"route add default via {HIJACK_GW4} dev eth0"]
        if "6" in self.families:
            lines += [f"addr add {self.pod_ip(i, '6')}/128 dev eth0", f"route add default via {CALI_LL6} dev eth0"]
        return lines

    def _by_family(self, v4: str, v6: str) -> list[str]:
        return [v4 if f == "4" else v6 for f in self.families]


@dataclass(frozen=True)
class FabricNode:
    """One node of a `FabricLab`, shaped as `runtime.RailHost` (what `RailPod` needs)."""

    fabric: FabricLab
    index: int

    node = property(lambda self: self.fabric.node(self.index))
    pod_netns = property(lambda self: self.fabric.pod_netns(self.index))
    rails = property(lambda self: self.fabric.rails)
    family = property(lambda self: self.fabric.family)

    def rail_ranges(self, k: int) -> list[list[dict]]:
        return self.fabric.rail_ranges(self.index, k)


def eth0_conflist(fabric: FabricLab, i: int, data_dir: str | Path) -> dict:
    """Underlay pod i's default network: macvlan on the node's uplink with host-local IPAM (one
    address), then route-tune on eth0 in underlay mode (it creates veth0 to the node)."""
    ranges = one_address_ranges(("10.6.0.0/24" if f == "4" else "fd00:6::/64", fabric.pod_ip(i, f), UNDERLAY_GW[f])
                                for f in fabric.families)
    return {"cniVersion": "1.0.0", "name": "underlay", "plugins": [
        {"type": "macvlan", "master": "uplink", "mode": "bridge",
         "ipam": {"type": "host-local", "dataDir": str(data_dir), "ranges": ranges}},
        {"type": "route-tune", "mode": "underlay"}]}


@dataclass
class FabricPods:
    """The pods of a `FabricLab`, one per node, each with its own `PluginEnv` (state, IPAM,
    libcni cache) and `RailPod`: `[macvlan + host-local, route-tune]` per rail through `runtime`
    ("libcni": our Go runner on Debian's libcni; "py": `PyRuntime`), run inside each node's netns.

    `keys` are route-tune keys for every rail (the lab's `mode` is always added); `env` extra
    environment for the plugins (e.g. ROUTE_TUNE_ENGINE); `device` and `ipam` the rails' first
    plugin and its IPAM (`runtime.rail_conflist`: "host-device" moves the node's `railK` into the
    pod, the SR-IOV shape).  Underlay: `setup_eth0()` ADDs each
    pod's eth0 chain first; `add_all()` does both.
    """

    fabric: FabricLab
    runtime: str = "libcni"
    keys: dict = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    runner: Path | None = None
    container_id: str = "fabric-pod"
    device: str = "macvlan"
    ipam: str = "host-local"
    penvs: dict[int, PluginEnv] = field(init=False, default_factory=dict)
    pods: dict[int, RailPod] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        for i in self.fabric.node_ids:
            penv = PluginEnv(self.fabric.tmp / f"node{i}", family=self.fabric.family,
                             defaults=self.fabric.node_defaults(), env=dict(self.env))
            view = self.fabric.view(i)
            rt = Libcni(view.node, penv, self.runner) if self.runtime == "libcni" else PyRuntime(view.node, penv)
            self.penvs[i] = penv
            self.pods[i] = RailPod(view, penv, rt, keys={"mode": self.fabric.mode, **self.keys},  # type: ignore[arg-type]
                                   container_id=f"{self.container_id}-{i}", device=self.device, ipam=self.ipam)

    def __getitem__(self, i: int) -> RailPod:
        return self.pods[i]

    def setup_eth0(self) -> None:
        """Underlay: ADD every pod's eth0 chain (nothing to do in overlay: the lab built eth0)."""
        self._eth0("add")

    def teardown_eth0(self) -> None:
        """Underlay: DEL every pod's eth0 chain (after its rails)."""
        self._eth0("delete")

    def _eth0(self, command: str) -> None:
        if self.fabric.mode != "underlay":
            return
        for i, pod in self.pods.items():
            getattr(pod.runtime, command)(eth0_conflist(self.fabric, i, self.penvs[i].ipam_dir),
                                          netns=pod.lab.pod_netns, ifname="eth0", container_id=pod.container_id)

    def add_rails(self) -> None:
        """ADD net1..netK on every node, the nodes in parallel (each has its own runtime)."""
        with ThreadPoolExecutor(self.fabric.nodes) as pool:
            for fut in [pool.submit(pod.add_all) for pod in self.pods.values()]:
                fut.result()

    def delete_rails(self) -> None:
        with ThreadPoolExecutor(self.fabric.nodes) as pool:
            for fut in [pool.submit(pod.delete_all) for pod in self.pods.values()]:
                fut.result()

    def add_all(self) -> None:
        self.setup_eth0()
        self.add_rails()
