"""Observed facts the planner needs, as plain frozen values (no netlink types).

``kernel.netlink`` fills them from the kernel; tests and the CLI can build them by hand or load them
from JSON, which is what keeps the planner pure and runnable without root.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import field

from cniplugin.records.values import value
from cniplugin.records.objects import Neighbour, Route, Rule, object_from_dict, to_dict

#: Node links whose addresses are not "node IPs" (coordinator's exclusion list, §2.1 step 11).
NODE_LINK_EXCLUDE = re.compile(
    r"^(docker|cbr|dummy|virbr|lxcbr|veth|cali|flannel|kube-ipvs|cni|vx-submariner|cilium)"
    r"|^lo$")


@value
class Link:
    index: int
    name: str
    kind: str = ""
    mac: str = ""
    up: bool = True
    txqlen: int = 0
    peer_index: int = 0          # IFLA_LINK: a veth's peer ifindex (in the peer's netns)
    peer_nsid: int = -1          # IFLA_LINK_NETNSID: the peer's netns, as this netns names it
    mtu: int = 0
    alias: str = ""              # IFLA_IFALIAS


@value
class Addr:
    ifname: str
    family: int
    address: str
    prefixlen: int
    link_local: bool = False

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.prefixlen}"


#: The facts' form of a rule (foreign or ours): what table choice needs, plus ``selectors``.
_RULE_FACT_FIELDS = ("family", "priority", "table", "src", "proto", "fwmark", "fwmask",
                     "selectors")


@value
class PodFacts:
    links: tuple[Link, ...] = ()
    addrs: tuple[Addr, ...] = ()
    main_routes: tuple[Route, ...] = ()       # every unicast main-table route (proto kept)
    used_tables: frozenset[int] = frozenset()  # tables referenced by rules or holding routes
    rules: tuple[Rule, ...] = ()                # every lookup rule, foreign or ours
    owned_routes: tuple[Route, ...] = ()       # proto 231, any table
    owned_rules: tuple[Rule, ...] = ()
    owned_neighbours: tuple[Neighbour, ...] = ()

    def link(self, name: str) -> Link | None:
        return next((link for link in self.links if link.name == name), None)

    def addrs_of(self, ifname: str, family: int | None = None) -> list[Addr]:
        return [a for a in self.addrs if a.ifname == ifname and not a.link_local
                and (family is None or a.family == family)]

    def main_routes_of(self, dev: str, family: int) -> list[Route]:
        return [r for r in self.main_routes if r.dev == dev and r.family == family]


@value
class NodeFacts:
    host_peer: Link | None                     # None: underlay veth not created yet
    node_ips: tuple[str, ...] = ()             # ordered; the first of a family = hijack gateway
    local_addrs: frozenset[str] = frozenset()  # every address on the node (for safety checks)
    gateways: frozenset[str] = frozenset()     # gateways of the node's main default routes
    # The subnets of the node addresses it reaches the pod from (its "own networks"), and the
    # pod addresses the node already routes to another device with a host route.
    own_networks: tuple[str, ...] = ()
    claims: tuple[tuple[str, str], ...] = ()   # (pod address, node device that has it)


@value
class Facts:
    pod: PodFacts
    node: NodeFacts | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict:
        """JSON form, so the CLI can plan from a saved snapshot without root."""
        def plain(value, name=""):
            if name == "rules":  # PodFacts.rules keeps its own (kind-less) form
                return [{f: getattr(r, f) for f in _RULE_FACT_FIELDS} for r in value]
            if isinstance(value, (Route, Rule, Neighbour)):
                return to_dict(value)
            if dataclasses.is_dataclass(value):
                return {f.name: plain(getattr(value, f.name), f.name)
                        for f in dataclasses.fields(value)}
            if isinstance(value, (tuple, list)):
                return [plain(v) for v in value]
            if isinstance(value, frozenset):
                return sorted(value)
            return value
        return plain(self)

    @classmethod
    def from_dict(cls, data: dict) -> Facts:
        pod = data["pod"]
        pod_facts = PodFacts(
            links=tuple(Link(**link) for link in pod.get("links", ())),
            addrs=tuple(Addr(**a) for a in pod.get("addrs", ())),
            main_routes=tuple(object_from_dict(r) for r in pod.get("main_routes", ())),
            used_tables=frozenset(pod.get("used_tables", ())),
            rules=tuple(Rule(**{"proto": 0, **r}) for r in pod.get("rules", ())),
            owned_routes=tuple(object_from_dict(r) for r in pod.get("owned_routes", ())),
            owned_rules=tuple(object_from_dict(r) for r in pod.get("owned_rules", ())),
            owned_neighbours=tuple(object_from_dict(n) for n in pod.get("owned_neighbours", ())),
        )
        node = data.get("node")
        node_facts = None
        if node:
            peer = node.get("host_peer")
            node_facts = NodeFacts(
                host_peer=Link(**peer) if peer else None, node_ips=tuple(node.get("node_ips", ())),
                local_addrs=frozenset(node.get("local_addrs", ())),
                gateways=frozenset(node.get("gateways", ())),
                own_networks=tuple(node.get("own_networks", ())),
                claims=tuple(tuple(c) for c in node.get("claims", ())))
        return cls(pod=pod_facts, node=node_facts, warnings=tuple(data.get("warnings", ())))
