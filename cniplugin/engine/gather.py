"""The facts a plan needs, read through a ``_netlink`` session (pod side, node side), and
the live route-tune objects ADD and CHECK compare against.

Every read is one kernel-filtered request; docs/routing.md ("Reading and writing the kernel")
lists them. ``_netlink`` re-exports these functions (the CLI imports them from there).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from cniplugin.protocol.errors import InterfaceNotFound, RouteConflict
from cniplugin.engine.facts import NODE_LINK_EXCLUDE, Addr, Link, NodeFacts, PodFacts
from cniplugin.engine.objects import MAIN_TABLE, KernelObject, Rule
from cniplugin._version import RTPROT_ROUTE_TUNE

if TYPE_CHECKING:
    from cniplugin.kernel.netlink import Netlink


def _owned_rule(r) -> Rule:
    # fwmask 0xffffffff is what the kernel reports for a plain ``fwmark X`` rule
    return Rule(r.family, r.priority, r.table, r.src, r.proto, r.fwmark,
                r.fwmask if r.fwmark else 0)


def gather_pod(nl: Netlink) -> PodFacts:
    """Everything the planner needs from the pod: one dump each of links, addresses, routes
    (both families, every table), rules and neighbours (pod tables are tiny)."""
    links = nl.links()
    names = {link.index: link.name for link in links}
    routes = nl.routes()
    rules = nl.rules()
    return PodFacts(
        links=tuple(links), addrs=tuple(nl.addresses(names=names)),
        main_routes=tuple(r for r in routes if r.table == MAIN_TABLE),
        used_tables=frozenset(r.table for r in routes),
        rules=tuple(rules),
        owned_routes=tuple(r for r in routes if r.proto == RTPROT_ROUTE_TUNE),
        owned_rules=tuple(_owned_rule(r) for r in rules if r.proto == RTPROT_ROUTE_TUNE),
        owned_neighbours=tuple(nl.owned_neighbours()))


def verified_peer(nl: Netlink, pod_link: Link, node_nsid_in_pod: int) -> Link | None:
    """The node end of the pod veth ``pod_link``, or None unless all three ties hold: pod_link
    is a veth, its IFLA_LINK names a node veth whose IFLA_LINK is pod_link, and pod_link's
    link-netnsid is this node netns."""
    if pod_link.kind != "veth" or pod_link.peer_nsid != node_nsid_in_pod:
        return None
    peer = nl.link_by_index(pod_link.peer_index)
    if peer is None or peer.kind != "veth" or peer.peer_index != pod_link.index:
        return None
    return peer


def gather_node(nl: Netlink, pod_eth0: Link | None, eth0_addrs: list[str],
                node_nsid_in_pod: int, *, peer_required: bool = True) -> NodeFacts:
    """The host peer of ``pod_eth0`` (verified; overlay: eth0's, underlay: veth0's) and the
    node IPs, as coordinator finds them.

    Requests: one link get for the peer, one address dump, one link get per addressed link
    (names for the exclusion list), a route get per pod address only when no node address
    shares its subnet, and one FIB-match lookup per family for the default gateways.
    """
    peer = verified_peer(nl, pod_eth0, node_nsid_in_pod) if pod_eth0 is not None else None
    if peer is None and peer_required:
        name = pod_eth0.name if pod_eth0 is not None else "eth0"
        raise InterfaceNotFound(
            f"pod {name} is not a veth whose peer is in this node netns; overlay mode "
            f"needs the cluster CNI's veth (podDefaultCniNic)")
    records = nl.address_records()
    # Names only for links with a usable address (a node has hundreds of pod veths: no dump).
    names = {i: nl._name_of(i) for i in dict.fromkeys(r[0] for r in records if not r[4])}
    addrs = [Addr(names.get(i, ""), *rest) for i, *rest in records]
    usable = [a for a in addrs if a.ifname and not a.link_local
              and not NODE_LINK_EXCLUDE.search(a.ifname)]
    node_ips: list[str] = []
    for ip in eth0_addrs:  # the address the node uses to reach the pod comes first
        pod_ip = ipaddress.ip_address(ip)
        same = next((a.address for a in usable if a.family == pod_ip.version and a.prefixlen
                     < pod_ip.max_prefixlen and pod_ip in ipaddress.ip_interface(a.cidr).network
                     and a.address != ip), "")
        if not same:
            try:
                same = nl.route_get(ip).prefsrc
            except RouteConflict:
                continue
        if same and same not in node_ips:
            node_ips.append(same)
    node_ips += [a.address for a in usable if a.address not in node_ips]
    families = {ipaddress.ip_address(ip).version for ip in eth0_addrs} or {4, 6}
    gateways = frozenset(g for fam in sorted(families) for g in nl.default_gateways(fam))
    first = {}  # family -> the node's first (primary) address, the one it reaches the pod from
    for ip in node_ips:
        first.setdefault(ipaddress.ip_address(ip).version, ip)
    own = tuple(str(ipaddress.ip_interface(a.cidr).network) for a in usable
                if a.address in first.values() and a.prefixlen < (32 if a.family == 4 else 128))
    return NodeFacts(host_peer=peer, node_ips=tuple(dict.fromkeys(node_ips)),
                     local_addrs=frozenset(a.address for a in addrs), gateways=gateways,
                     own_networks=own)


def node_claims(nl: Netlink, addresses: list[str], host_peer: str) -> tuple[tuple[str, str], ...]:
    """The pod addresses the node already sends elsewhere with a host route (/32, /128): the
    address of another workload on this node. One FIB-match lookup per address."""
    claims = []
    for cidr in addresses:
        ip = str(ipaddress.ip_interface(cidr).ip)
        match = nl.route_match(ip)
        if match and match[0] == ipaddress.ip_address(ip).max_prefixlen and match[1] \
                and match[1] != host_peer:
            claims.append((ip, match[1]))
    return tuple(claims)


def owned_node_objects(nl: Netlink, host_rule_table: int | None, host_peer: str,
                       by_peer: bool = True) -> list[KernelObject]:
    """route-tune's objects on the node that concern this pod: the rules, the hostRuleTable
    routes and the neighbours on the host peer (all filtered by the kernel).

    ``by_peer`` (ADD) reads only the routes via the host peer: the cost does not grow with the
    node's other attachments. CHECK passes False to also see our routes moved elsewhere.
    """
    if not host_rule_table:
        routes = []
    elif by_peer:
        routes = nl.routes(table=host_rule_table, proto=RTPROT_ROUTE_TUNE, dev=host_peer) \
            if host_peer else []
    else:
        routes = nl.routes(table=host_rule_table, proto=RTPROT_ROUTE_TUNE)
    neighbours = nl.owned_neighbours(dev=host_peer) if host_peer else []
    return [*nl.owned_rules(), *routes, *neighbours]


def owned_pod_objects(nl: Netlink) -> list[KernelObject]:
    """route-tune's objects in a pod: every rule, route and neighbour with protocol 231."""
    return [*nl.owned_rules(), *nl.routes(proto=RTPROT_ROUTE_TUNE), *nl.owned_neighbours()]
