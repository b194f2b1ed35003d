"""The netlink adapter: the only module that imports pyroute2.

A ``Netlink`` session is bound to the netns the calling thread is in when it is opened (use
``session(fd)``, which enters the netns for the thread first: ``IPRoute(netns=...)`` forks and
may create namespaces). It reads kernel state into ``_facts``/``_objects`` values, applies and
removes ``_objects`` idempotently, and turns every NetlinkError into an ``_errors`` type.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from . import _netns
from ._errors import InterfaceNotFound, RouteConflict
from ._facts import NODE_LINK_EXCLUDE, Addr, Link, NodeFacts, PodFacts, RuleInfo
from ._objects import (MAIN_TABLE, SCOPE_LINK, SCOPE_UNIVERSE, KernelObject, LinkAttr,
                       Neighbour, Route, Rule, Sysctl, default_dst)
from ._version import RTPROT_ROUTE_TUNE

RTM_F_LOOKUP_TABLE = 0x1000   # report the table the lookup really used (pyroute2 lacks it)
RTN_UNICAST = 1
FR_ACT_TO_TBL = 1
NUD_PERMANENT = 0x80
IFF_UP = 0x1
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_FAMILY = {socket.AF_INET: 4, socket.AF_INET6: 6}
_SCOPES = {0: SCOPE_UNIVERSE, 253: SCOPE_LINK, 254: "host"}
_SCOPE_NUMBERS = {v: k for k, v in _SCOPES.items()}
_GONE = (errno.ENOENT, errno.ESRCH, errno.ENODEV)


@dataclass(frozen=True)
class RouteGet:
    """What ``ip route get`` says: the table really used, the device, next hop and source."""

    table: int
    dev: str
    gateway: str = ""
    prefsrc: str = ""


@contextlib.contextmanager
def session(fd: int | None) -> Iterator[Netlink]:
    """A Netlink session in netns ``fd`` (None: the thread's current netns), thread stays inside."""
    with _netns.entered(fd):
        nl = Netlink()
        try:
            yield nl
        finally:
            nl.close()


class Netlink:
    def __init__(self) -> None:
        from pyroute2 import IPRoute

        # strict_check: the kernel filters dumps by table/protocol/ifindex, so a node with
        # thousands of foreign routes in hostRuleTable costs nothing to read.
        self.ipr = IPRoute(strict_check=True)
        self._names: dict[int, str] | None = None
        self._indexes: dict[str, int] = {}   # name -> ifindex, positive lookups only

    def close(self) -> None:
        self.ipr.close()

    # -- reading ------------------------------------------------------------------------
    def links(self) -> list[Link]:
        links = [_link(msg) for msg in self.ipr.link("dump")]
        self._names = {link.index: link.name for link in links}
        return links

    def link(self, name: str) -> Link | None:
        try:
            return _link(self.ipr.link("get", ifname=name)[0])
        except _netlink_error() as err:
            if err.code == errno.ENODEV:
                return None
            raise

    def link_by_index(self, index: int) -> Link | None:
        try:
            return _link(self.ipr.link("get", index=index)[0])
        except _netlink_error() as err:
            if err.code == errno.ENODEV:
                return None
            raise

    def addresses(self) -> list[Addr]:
        names = self._index_names()
        out = []
        for msg in self.ipr.addr("dump"):
            family = _FAMILY.get(msg["family"])
            address = msg.get_attr("IFA_ADDRESS")
            if family is None or address is None:
                continue
            ip = ipaddress.ip_address(address)
            out.append(Addr(names.get(msg["index"], ""), family, str(ip), msg["prefixlen"],
                            link_local=ip.is_link_local))
        return out

    def routes(self, family: int | None = None, table: int | None = None,
               proto: int | None = None) -> list[Route]:
        filters = {}
        if table is not None:
            filters["table"] = table
        if proto is not None:
            filters["proto"] = proto
        families = [family] if family else [4, 6]
        names = self._index_names()
        out = []
        for fam in families:
            for msg in self.ipr.route("dump", family=_AF[fam], **filters):
                out += _routes(msg, names)
        return out

    def rules(self, family: int | None = None) -> list[RuleInfo]:
        out = []
        for fam in [family] if family else [4, 6]:
            for msg in self.ipr.rule("dump", family=_AF[fam]):
                if msg["action"] != FR_ACT_TO_TBL:
                    continue
                src = msg.get_attr("FRA_SRC")
                out.append(RuleInfo(
                    family=fam, priority=msg.get_attr("FRA_PRIORITY") or 0,
                    table=msg.get_attr("FRA_TABLE") or msg["table"],
                    src=f"{src}/{msg['src_len']}" if src else "",
                    proto=msg.get_attr("FRA_PROTOCOL") or 0))
        return out

    def owned_rules(self) -> list[Rule]:
        return [Rule(r.family, r.priority, r.table, r.src) for r in self.rules()
                if r.proto == RTPROT_ROUTE_TUNE]

    def owned_neighbours(self, dev: str | None = None) -> list[Neighbour]:
        names = self._index_names()
        filters = {}
        if dev is not None:
            index = self._index(dev)
            if index is None:
                return []
            filters["ifindex"] = index
        out = []
        for fam in (4, 6):
            for msg in self.ipr.neigh("dump", family=_AF[fam], **filters):
                if msg.get_attr("NDA_PROTOCOL") != RTPROT_ROUTE_TUNE:
                    continue
                out.append(Neighbour(fam, names.get(msg["ifindex"], ""),
                                     str(ipaddress.ip_address(msg.get_attr("NDA_DST"))),
                                     msg.get_attr("NDA_LLADDR") or ""))
        return out

    def route_get(self, dst: str, src: str | None = None, iif: str | None = None) -> RouteGet:
        """``ip route get``; ``table`` is the table the rules really selected."""
        kwargs = {"dst": dst, "flags": RTM_F_LOOKUP_TABLE}
        if src:
            kwargs["src"] = src
        if iif:
            kwargs["iif"] = self._index(iif)
        try:
            msg = self.ipr.route("get", **kwargs)[0]
        except _netlink_error() as err:
            raise RouteConflict(f"no route to {dst}" + (f" from {src}" if src else "")
                                + f": {os.strerror(err.code)}") from None
        return RouteGet(table=msg.get_attr("RTA_TABLE") or msg["table"],
                        dev=self._index_names().get(msg.get_attr("RTA_OIF"), ""),
                        gateway=msg.get_attr("RTA_GATEWAY") or "",
                        prefsrc=msg.get_attr("RTA_PREFSRC") or "")

    def node_ns_id(self, node_fd: int) -> int:
        """The id this netns gives the node netns (-1: none assigned)."""
        info = self.ipr.get_netnsid(fd=node_fd) or {}
        nsid = info.get("nsid")
        return -1 if nsid is None or nsid >= 2**31 else nsid

    def read_attr(self, obj: KernelObject) -> str | None:
        """The live value of a sysctl or link attribute (None: it does not exist)."""
        if isinstance(obj, Sysctl):
            try:
                with open(f"/proc/sys/{obj.path}") as f:
                    return f.read().strip()
            except FileNotFoundError:
                return None
        link = self.link(obj.ifname)
        if link is None:
            return None
        return str(link.txqlen) if obj.attr == "txqlen" else link.mac

    # -- writing ------------------------------------------------------------------------
    def apply(self, obj: KernelObject) -> None:
        """Install ``obj``; converges when it (or the identical object) is already there."""
        try:
            if isinstance(obj, Rule):
                self._rule_add(obj)
            elif isinstance(obj, Route):
                self.ipr.route("replace", **self._route_spec(obj))
            elif isinstance(obj, Neighbour):
                self.ipr.neigh("replace", family=_AF[obj.family], dst=obj.ip, lladdr=obj.lladdr,
                               ifindex=self._require_index(obj.dev), state=NUD_PERMANENT,
                               protocol=RTPROT_ROUTE_TUNE)
            elif isinstance(obj, Sysctl):
                with open(f"/proc/sys/{obj.path}", "w") as f:
                    f.write(obj.value)
            else:
                self._link_set(obj, obj.value)
        except _netlink_error() as err:
            raise _refused(obj, err) from None

    def remove(self, obj: KernelObject) -> None:
        """Delete ``obj`` exactly (explicit priority, family, device, protocol); gone is fine."""
        try:
            if isinstance(obj, Rule):
                self.ipr.rule("del", **_rule_spec(obj))
            elif isinstance(obj, Route):
                if self._index(obj.dev) is not None:
                    self.ipr.route("del", **self._route_spec(obj))
            elif isinstance(obj, Neighbour):
                index = self._index(obj.dev)
                if index is not None:
                    self.ipr.neigh("del", family=_AF[obj.family], dst=obj.ip, ifindex=index)
        except _netlink_error() as err:
            if err.code not in _GONE:
                raise _refused(obj, err, "remove") from None

    def restore(self, obj: KernelObject, original: str | None = None) -> None:
        """Put back a displaced foreign route, or an original sysctl/link value."""
        try:
            if isinstance(obj, Route):
                if self._index(obj.dev) is not None:
                    self.ipr.route("add", **self._route_spec(obj))
            elif isinstance(obj, Sysctl) and original is not None:
                with open(f"/proc/sys/{obj.path}", "w") as f:
                    f.write(original)
            elif isinstance(obj, LinkAttr) and original is not None:
                if self._index(obj.ifname) is not None:
                    self._link_set(obj, original)
        except FileNotFoundError:
            pass  # the interface (and its sysctls) went away: nothing to restore
        except _netlink_error() as err:
            if err.code not in (*_GONE, errno.EEXIST, errno.ENETUNREACH):
                raise _refused(obj, err, "restore") from None

    # -- helpers ------------------------------------------------------------------------
    def _index_names(self) -> dict[int, str]:
        if self._names is None:
            self.links()
        return self._names

    def _index(self, name: str) -> int | None:
        if name not in self._indexes:
            link = self.link(name)
            if link is None:
                return None
            self._indexes[name] = link.index
        return self._indexes[name]

    def _require_index(self, name: str) -> int:
        index = self._index(name)
        if index is None:
            raise InterfaceNotFound(f"interface {name!r} is gone")
        return index

    def _route_spec(self, route: Route) -> dict:
        spec = {"family": _AF[route.family], "dst": route.dst, "table": route.table,
                "oif": self._require_index(route.dev), "priority": route.metric,
                "proto": route.proto, "type": "unicast"}
        if route.gateway:
            spec["gateway"] = route.gateway
        if route.src:
            spec["prefsrc"] = route.src
        if route.family == 4:
            spec["scope"] = _SCOPE_NUMBERS.get(route.scope, 0)
        return spec

    def _rule_add(self, rule: Rule) -> None:
        try:
            self.ipr.rule("add", **_rule_spec(rule))
        except _netlink_error() as err:
            if err.code != errno.EEXIST:
                raise
            live = [Rule(r.family, r.priority, r.table, r.src, r.proto)
                    for r in self.rules(rule.family)]
            if rule not in live:
                raise RouteConflict(
                    f"`{rule.render()}` collides with an existing rule that is not "
                    f"route-tune's; remove that rule or change hostRulePriority") from None

    def _link_set(self, attr: LinkAttr, value: str) -> None:
        index = self._require_index(attr.ifname)
        if attr.attr == "txqlen":
            self.ipr.link("set", index=index, txqlen=int(value))
        else:
            self.ipr.link("set", index=index, address=value)


def _netlink_error():
    from pyroute2.netlink.exceptions import NetlinkError

    return NetlinkError


def _refused(obj: KernelObject, err, action: str = "install") -> RouteConflict:
    return RouteConflict(f"the kernel refused to {action} `{obj.render()}`: "
                         f"{os.strerror(err.code)} (errno {err.code})")


def _rule_spec(rule: Rule) -> dict:
    # Explicit priority and family on add AND del: pyroute2 defaults them (32000, AF_INET).
    spec = {"family": _AF[rule.family], "priority": rule.priority, "table": rule.table,
            "action": "to_tbl", "protocol": rule.proto}
    if rule.src:
        ip, _, length = rule.src.partition("/")
        spec.update(src=ip, src_len=int(length))
    else:
        spec["src_len"] = 0
    return spec


def _link(msg) -> Link:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info else ""
    nsid = msg.get_attr("IFLA_LINK_NETNSID")
    return Link(index=msg["index"], name=msg.get_attr("IFLA_IFNAME"), kind=kind or "",
                mac=msg.get_attr("IFLA_ADDRESS") or "", up=bool(msg["flags"] & IFF_UP),
                txqlen=msg.get_attr("IFLA_TXQLEN") or 0, peer_index=msg.get_attr("IFLA_LINK") or 0,
                peer_nsid=-1 if nsid is None else nsid)


def _routes(msg, names: dict[int, str]) -> list[Route]:
    """One netlink route message as Routes (a multipath route becomes one per next hop)."""
    if msg["type"] != RTN_UNICAST:
        return []
    family = _FAMILY[msg["family"]]
    dst = msg.get_attr("RTA_DST")
    dst = str(ipaddress.ip_network(f"{dst}/{msg['dst_len']}")) if dst else default_dst(family)
    base = dict(family=family, table=msg.get_attr("RTA_TABLE") or msg["table"], dst=dst,
                scope=_SCOPES.get(msg["scope"], str(msg["scope"])),
                src=msg.get_attr("RTA_PREFSRC") or "", metric=msg.get_attr("RTA_PRIORITY") or 0,
                proto=msg["proto"])
    legs = msg.get_attr("RTA_MULTIPATH")
    if legs:
        hops = [(leg["oif"], leg.get_attr("RTA_GATEWAY") or "") for leg in legs]
    else:
        hops = [(msg.get_attr("RTA_OIF"), msg.get_attr("RTA_GATEWAY") or "")]
    return [Route(dev=names.get(oif, ""), gateway=gw, **base) for oif, gw in hops if oif]


# -- fact gathering (each runs inside a session of the right netns) --------------------
def gather_pod(nl: Netlink) -> PodFacts:
    """Everything the planner needs from the pod (pod tables are tiny: dump them all)."""
    links = nl.links()
    routes = nl.routes()
    rules = nl.rules()
    return PodFacts(
        links=tuple(links), addrs=tuple(nl.addresses()),
        main_routes=tuple(r for r in routes if r.table == MAIN_TABLE),
        used_tables=frozenset(r.table for r in routes),
        rules=tuple(rules),
        owned_routes=tuple(r for r in routes if r.proto == RTPROT_ROUTE_TUNE),
        owned_rules=tuple(Rule(r.family, r.priority, r.table, r.src)
                          for r in rules if r.proto == RTPROT_ROUTE_TUNE),
        owned_neighbours=tuple(nl.owned_neighbours()))


def gather_node(nl: Netlink, pod_eth0: Link, eth0_addrs: list[str],
                node_nsid_in_pod: int) -> NodeFacts:
    """The host peer of pod eth0 (verified) and the node IPs, as coordinator finds them."""
    peer = nl.link_by_index(pod_eth0.peer_index) if pod_eth0.kind == "veth" else None
    if (peer is None or peer.kind != "veth" or peer.peer_index != pod_eth0.index
            or pod_eth0.peer_nsid != node_nsid_in_pod):
        raise InterfaceNotFound(
            f"pod {pod_eth0.name} is not a veth whose peer is in this node netns; overlay mode "
            f"needs the cluster CNI's veth (podDefaultCniNic)")
    links = nl.links()
    addrs = nl.addresses()
    node_ips: list[str] = []
    for ip in eth0_addrs:  # the source the node uses to reach the pod comes first
        try:
            src = nl.route_get(ip).prefsrc
        except RouteConflict:
            continue
        if src and src not in node_ips:
            node_ips.append(src)
    excluded = {link.name for link in links if NODE_LINK_EXCLUDE.search(link.name)}
    for addr in addrs:
        if addr.ifname not in excluded and not addr.link_local and addr.address not in node_ips:
            node_ips.append(addr.address)
    gateways = frozenset(r.gateway for r in nl.routes(table=MAIN_TABLE)
                         if r.is_default and r.gateway)
    return NodeFacts(host_peer=peer, node_ips=tuple(node_ips),
                     local_addrs=frozenset(a.address for a in addrs), gateways=gateways)


def owned_node_objects(nl: Netlink, host_rule_table: int, host_peer: str) -> list[KernelObject]:
    """route-tune's objects on the node: the rules, hostRuleTable routes, neighbours on the peer."""
    routes = nl.routes(table=host_rule_table, proto=RTPROT_ROUTE_TUNE)
    return [*nl.owned_rules(), *routes, *nl.owned_neighbours(dev=host_peer)]


def owned_pod_objects(nl: Netlink) -> list[KernelObject]:
    """route-tune's objects in a pod: every rule, route and neighbour with protocol 231."""
    return [*nl.owned_rules(), *nl.routes(proto=RTPROT_ROUTE_TUNE), *nl.owned_neighbours()]
