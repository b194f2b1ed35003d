"""Lab names, session clean-up and the lab variants built on ``cniplugin.lab.topology``."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from cniplugin.lab.sessions import LabNames
from cniplugin.lab.topology import (CALI_MAC, OverlayLab, decode_many, cleanup, ip_batch,
                                    netns_names, run)
from harness.host import require_root, wait_until

#: This session's lab names: rtC<pid base36>x<n> (at most 11 characters with the counter). Other
#: sessions run at the same time, so only labs of dead owners are removed.
NAMES = LabNames("rtC")


@pytest.fixture(scope="session")
def lab_session() -> Iterator[None]:
    """Root check once, dead sessions' leftovers removed, this session's removed at its end."""
    require_root("ip", "nft")
    NAMES.cleanup_stale()
    yield
    cleanup(NAMES.prefix)


#: ``ip -batch`` lines of a namespace with one veth pair ``va`` 10.9.0.1/24 - ``vb`` 10.8.0.1/24.
VETH_PAIR = ("link set lo up", "link add va type veth peer name vb", "link set va up",
             "link set vb up", "addr add 10.9.0.1/24 dev va", "addr add 10.8.0.1/24 dev vb")


@contextlib.contextmanager
def scratch_netns(role: str, lines: Iterable[str] = (), lines6: Iterable[str] = ()) -> Iterator[str]:
    """A throwaway netns named by ``NAMES`` (DAD off), built by ``ip -batch`` ``lines`` and
    ``ip -6 -batch`` ``lines6``; deleted on exit."""
    name = f"{NAMES.next()}-{role}"
    ip_batch([f"netns add {name}"])
    try:
        run("ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0")
        ip_batch(["link set lo up", *lines], name)
        ip_batch(list(lines6), name, "-6")
        yield name
    finally:
        ip_batch([f"netns del {n}" for n in netns_names(name) if n == name])


def _base_sysctls(lab: OverlayLab) -> None:
    """No DAD anywhere; the node forwards (both families)."""
    node = {"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda ns: lab._sysctls(ns, {
            "net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0,
            **(node if ns == lab.node else {})}), lab.namespaces))


class UnderlayLab(OverlayLab):
    """The lab's namespaces, but the pod's eth0 is a macvlan on the node's uplink (underlay).

    node ``uplink`` 10.6.0.4/24 (fd00:6::4/64), underlay gateway 10.6.0.1 (fd00:6::1) in the
    ``infra`` ns; pod eth0 10.6.0.50/24 (fd00:6::50/64) default via that gateway; rails as in
    the overlay lab. route-tune's first (eth0) ADD in underlay mode creates the veth0 pair and
    its nftables table.
    """

    UNDERLAY = {"4": ("10.6.0.4/24", "10.6.0.1", "10.6.0.50/24"),
                "6": ("fd00:6::4/64", "fd00:6::1", "fd00:6::50/64")}

    def _build(self) -> None:
        ks = range(1, self.rails + 1)
        ip_batch([f"netns add {n}" for n in self.namespaces])
        _base_sysctls(self)
        nodad = {"4": "", "6": " nodad"}
        node = ["link set lo up", f"link add uplink type veth peer name tonode netns {self.infra}",
                "link set uplink up", "link add eth0 link uplink type macvlan mode bridge",
                f"link set eth0 netns {self.pod}"]
        node += [f"link add rail{k} type veth peer name rail netns {self.gw(k)}" for k in ks]
        node += [f"link set rail{k} up" for k in ks]
        pod, infra = ["link set lo up", "link set eth0 up"], ["link set lo up", "link set tonode up"]
        for fam in self.families:
            node_ip, gw, pod_ip = self.UNDERLAY[fam]
            node.append(f"addr add {node_ip} dev uplink{nodad[fam]}")
            infra.append(f"addr add {gw}/{node_ip.split('/')[1]} dev tonode{nodad[fam]}")
            pod += [f"addr add {pod_ip} dev eth0{nodad[fam]}", f"route add default via {gw} dev eth0"]
        node += [f"route add default via {self.UNDERLAY[f][1]} dev uplink" for f in self.families]
        jobs = [(self.node, node), (self.infra, infra)]
        for k in ks:
            jobs.append((self.gw(k), ["link set lo up", "link set rail up"] + [
                f"addr add {self.gw_ip(k, fam)}/{24 if fam == '4' else 64} dev rail{nodad[fam]}"
                for fam in self.families]))
        for ns, lines in jobs:
            ip_batch(lines, ns)
        ip_batch(pod, self.pod)

    def eth0_prev(self) -> dict:
        """The prevResult macvlan + IPAM would hand route-tune for eth0."""
        ips = [{"address": self.UNDERLAY[f][2], "gateway": self.UNDERLAY[f][1], "interface": 0}
               for f in self.families]
        return {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": self.pod_netns}],
                "ips": ips}


@dataclass
class Farm(OverlayLab):
    """Many pods (IPv4): one node netns, ``pods`` pod netns and ``rails`` rails shared by all.

    Pod i (0-based): ns ``<prefix>-p<i>``, eth0 ``10.233.120.<i+1>/32`` whose node end is
    ``cali<i>`` (Calico MAC, proxy ARP); on rail k its macvlan ``netk`` on the node's ``railk``
    gets ``172.16.1k.<20+i>/24`` (static IPAM) with gateway ``172.16.1k.254``.
    """

    pods: int = 2

    def pod(self, i: int) -> str:  # type: ignore[override]
        return f"{self.prefix}-p{i}"

    def pod_ip(self, i: int) -> str:  # type: ignore[override]
        return f"10.233.120.{i + 1}"

    def rail_ip(self, i: int, k: int) -> str:  # type: ignore[override]
        return f"172.16.1{k}.{20 + i}"

    @property
    def namespaces(self) -> list[str]:
        return ([self.node, self.infra] + [self.pod(i) for i in range(self.pods)]
                + [self.gw(k) for k in range(1, self.rails + 1)])

    def _build(self) -> None:
        ip_batch([f"netns add {n}" for n in self.namespaces])
        _base_sysctls(self)
        node = ["link set lo up", f"link add uplink type veth peer name tonode netns {self.infra}",
                "link set uplink up", "addr add 10.1.20.4/24 dev uplink"]
        cali: dict[str, str | int] = {}
        jobs = [(self.infra, ["link set lo up", "link set tonode up", "addr add 10.1.20.1/24 dev tonode"])]
        for i in range(self.pods):
            node += [f"link add cali{i} address {CALI_MAC} type veth peer name eth0 netns {self.pod(i)}",
                     f"link set cali{i} up", f"route add {self.pod_ip(i)}/32 dev cali{i} scope link"]
            cali.update({f"net.ipv4.conf.cali{i}.proxy_arp": 1, f"net.ipv4.neigh.cali{i}.proxy_delay": 0})
            jobs.append((self.pod(i), ["link set lo up", "link set eth0 up",
                                       f"addr add {self.pod_ip(i)}/32 dev eth0",
                                       "route add 169.254.1.1 dev eth0 scope link",
                                       "route add default via 169.254.1.1 dev eth0"]))
        for k in range(1, self.rails + 1):
            node += [f"link add rail{k} type veth peer name rail netns {self.gw(k)}", f"link set rail{k} up"]
            jobs.append((self.gw(k), ["link set lo up", "link set rail up",
                                      f"addr add 172.16.1{k}.254/24 dev rail",
                                      f"addr add 198.18.{k}.1/32 dev lo"]))
        node.append("route add default via 10.1.20.1 dev uplink")
        ip_batch(node, self.node)
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ip_batch, lines, ns) for ns, lines in jobs]
            futures.append(pool.submit(self._sysctls, self.node, cali))
            for fut in futures:
                fut.result()

    def conflist(self, i: int, k: int, keys: dict | None = None) -> dict:
        """Rail k's chain for pod i: macvlan on railk with static IPAM, then route-tune."""
        ipam = {"type": "static", "addresses": [{"address": f"{self.rail_ip(i, k)}/24",
                                                 "gateway": f"172.16.1{k}.254"}]}
        return {"cniVersion": "1.0.0", "name": f"rail{k}", "plugins": [
            {"type": "macvlan", "master": f"rail{k}", "mode": "bridge", "ipam": ipam},
            {"type": "route-tune", **(keys or {})}]}

    def route_get_many(self, ns: str, queries: list[tuple[str, str | None]]) -> list[dict]:
        """``ip route get DST [from SRC]`` for every query, in ONE ``ip -batch`` process."""
        lines = [f"route get {dst}" + (f" from {src}" if src else "") for dst, src in queries]
        return [doc[0] for doc in decode_many(ip_batch(lines, ns, "-j"))]


def delete_pod_netns(lab: OverlayLab) -> None:
    """``ip netns del`` the pod and wait until the kernel has really destroyed it (its veth end
    ``cali<prefix>`` gone from the node): netns teardown runs asynchronously, and a process or
    thread still holding the netns would keep it alive - that is reported, after a minute."""
    run("ip", "netns", "del", lab.pod)

    def gone() -> bool:
        links = json.loads(run("ip", "-n", lab.node, "-j", "link", "show").stdout)
        return lab.cali not in {link["ifname"] for link in links}
    wait_until(gone, 60, f"{lab.pod} deleted, but {lab.cali} still on the node: something "
                         "still holds the pod's netns")
