"""The one fact gatherer (ADD, CHECK's callers and the CLI's ``facts``/``plan``/``show``): the
facts a plan needs, read through a ``kernel.netlink`` session (pod side, node side), the mode they
imply (resolved here, once per request), and the live route-tune objects ADD and CHECK compare
against.

Every read is one kernel-filtered request; docs/routing.md ("Reading and writing the kernel")
lists them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

from cniplugin._version import RTPROT_ROUTE_TUNE
from cniplugin.engine.attachment import Attachment, attachment_from_result
from cniplugin.engine.mode import resolve_mode
from cniplugin.kernel import netns as _netns
from cniplugin.kernel.netlink import Netlink
from cniplugin.kernel.reads import owned_rule
from cniplugin.kernel.veth import verified_peer
from cniplugin.protocol.errors import InterfaceNotFound, RouteConflict
from cniplugin.records.facts import NODE_LINK_EXCLUDE, Addr, Facts, Link, NodeFacts, PodFacts
from cniplugin.records.objects import (LOCAL_TABLE, MAIN_TABLE, RTPROT_BOOT, RTPROT_KERNEL,
                                       UNDERLAY_VETH, KernelObject, Route, connected_metric,
                                       default_metric)
from cniplugin.records.values import value

if TYPE_CHECKING:
    from cniplugin.protocol.invocation import Invocation


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
        owned_rules=tuple(owned_rule(r) for r in rules if r.proto == RTPROT_ROUTE_TUNE),
        owned_neighbours=tuple(nl.owned_neighbours()))


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
    names = {i: nl.name_of(i) for i in dict.fromkeys(r[0] for r in records if not r[4])}
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
            # The kernel may pick an excluded link's address (a VIP on lo, say) as the source,
            # and once hostRuleTable routes the pod through its veth it may pick another one than
            # at eth0's ADD: only a usable address is a node IP.
            if same not in {a.address for a in usable}:
                same = ""
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


# -- the gatherer ------------------------------------------------------------------------
@value
class Gathered:
    """What one gather found: the resolved mode, the facts, and the attachment (None without a
    prevResult)."""

    mode: str
    facts: Facts
    attachment: Attachment | None = None


def _mode(config, ifname: str, pod: PodFacts) -> str:
    """The mode of a request: resolved from the pod's links, here and nowhere else."""
    return resolve_mode(config, ifname, [link.name for link in pod.links])


@contextlib.contextmanager
def sessions_bound_to(pod_fd: int, node_fd: int) -> Iterator[tuple[Netlink, Netlink]]:
    """One netlink session bound to each netns for the whole request (the calling thread stays
    where it is); the pod's knows the node's (the underlay veth pair has an end on each side)."""
    with Netlink.bound_to(node_fd) as node_nl, Netlink.bound_to(pod_fd) as pod_nl:
        pod_nl.node = node_nl
        yield pod_nl, node_nl


def gather(config, ifname: str, pod_nl: Netlink, node_nl: Netlink, node_fd: int, *,
           prev_result=None, container_id: str = "", network: str = "",
           strict: bool = True) -> Gathered:
    """The facts for attaching ``ifname`` (pod first, then the node side its mode needs).

    ``strict`` (ADD): a missing podDefaultCniNic or host peer is an error. The CLI gathers
    with ``strict=False``: those become warnings and the node facts None (the plan then has no
    node side and says so), so a pod can be inspected from anywhere.
    """
    pod = gather_pod(pod_nl)
    mode = _mode(config, ifname, pod)
    eth0 = config.pod_default_cni_nic
    eth0_link = pod.link(eth0)
    warnings: list[str] = []
    node = None
    if eth0_link is None:
        if strict:
            raise InterfaceNotFound(
                f"podDefaultCniNic: interface {eth0!r} is not in the pod netns")
        warnings.append(f"no {eth0} in the pod: no node facts")
    else:
        try:
            node = _gather_node_side(pod, mode, eth0_link, pod_nl, node_nl, node_fd)
        except InterfaceNotFound as err:
            if strict:
                raise
            warnings.append(f"no node facts: {err.msg}")
    attachment = None
    if prev_result is not None:
        attachment = _attachment(config, ifname, prev_result, container_id, network, pod)
        if node is not None and node.host_peer is not None:
            node = replace(node, claims=node_claims(node_nl, list(attachment.addresses),
                                                    node.host_peer.name))
    return Gathered(mode, Facts(pod=pod, node=node, warnings=tuple(warnings)), attachment)


def _attachment(config, ifname: str, prev_result, container_id: str, network: str,
                pod: PodFacts) -> Attachment:
    """netK as prevResult (or the pod) describes it, with the MAC podMACPrefix gives it."""
    attachment = attachment_from_result(prev_result, ifname, container_id, network, pod)
    if config.pod_mac_prefix and attachment.addresses:
        from cniplugin.kernel import probe as _probe
        attachment = replace(attachment, mac=_probe.mac_from_prefix(
            config.pod_mac_prefix, attachment.addresses[0]))
    return attachment


def _gather_node_side(pod: PodFacts, mode: str, eth0_link: Link, pod_nl: Netlink,
                      node_nl: Netlink, node_fd: int) -> NodeFacts:
    nsid = pod_nl.node_ns_id(node_fd)
    eth0_addrs = [a.address for a in pod.addrs_of(eth0_link.name)]
    if mode != "underlay":
        return gather_node(node_nl, eth0_link, eth0_addrs, nsid)
    veth = pod.link(UNDERLAY_VETH)
    node = gather_node(node_nl, veth, eth0_addrs, nsid, peer_required=False)
    if veth is not None and node.host_peer is None:
        raise RouteConflict(
            f"{UNDERLAY_VETH} exists in the pod but is not a veth whose peer is on this "
            f"node; underlay mode needs that name for its veth pair")
    return node


def gather_invocation(inv: Invocation, pod_nl: Netlink, node_nl: Netlink, node_fd: int, *,
                      strict: bool = True) -> Gathered:
    """``gather`` for an engine invocation (ADD, and the CLI's live ``plan``)."""
    return gather(inv.config, inv.ifname, pod_nl, node_nl, node_fd,
                  prev_result=inv.prev_result, container_id=inv.container_id,
                  network=inv.network, strict=strict)


def gather_facts(pod_fd: int, node_fd: int | None, config, ifname: str = "") -> Facts:
    """The CLI's facts of a pod (``facts``, ``show``): ``gather`` with ``strict=False``. Without
    ``ifname`` the mode is what ``auto`` gives a secondary interface (underlay once the pod
    has the underlay veth), so the host peer is the one a next ADD would use."""
    if node_fd is None:  # this process's netns, taken before a session moves the thread
        home = _netns.current_netns()
        try:
            return gather_facts(pod_fd, home, config, ifname)
        finally:
            os.close(home)
    with sessions_bound_to(pod_fd, node_fd) as (pod_nl, node_nl):
        return gather(config, ifname, pod_nl, node_nl, node_fd, strict=False).facts


def assumed_facts(inv: Invocation) -> Facts:
    """Facts assumed from prevResult alone, for planning where no pod can be read (the CLI's
    ``plan`` without saved facts).

    Assumed: the pod has ``podDefaultCniNic`` (a veth, addresses unknown) and netK (a
    macvlan) with prevResult's addresses and MAC; netK's main table holds the kernel's
    connected routes and prevResult's routes via netK (as IPAM installs them); no rules or
    tables besides main and local; no node facts. So the plan has no table 100, no cluster routes and no node side.
    """
    ifname, eth0, prev = inv.ifname, inv.config.pod_default_cni_nic, inv.prev_result
    mac = next((i.mac for i in prev.interfaces if i.name == ifname and i.mac), "")
    links = (Link(2, eth0, "veth"), Link(3, ifname, "macvlan", mac or ""))
    attachment = attachment_from_result(prev, ifname, inv.container_id, "", PodFacts())
    addrs, routes = [], []
    for cidr in attachment.addresses:
        iface = ipaddress.ip_interface(cidr)
        v = iface.version
        addrs.append(Addr(ifname, v, str(iface.ip), iface.network.prefixlen))
        routes.append(Route(v, MAIN_TABLE, str(iface.network), ifname,
                            scope="link" if v == 4 else "universe",
                            src=str(iface.ip) if v == 4 else "",
                            metric=connected_metric(v), proto=RTPROT_KERNEL))
    networks = [ipaddress.ip_interface(a).network for a in attachment.addresses]
    for route in prev.routes or []:
        dst = ipaddress.ip_network(str(route.dst), strict=False)
        gw = str(route.gw) if route.gw else ""
        if gw and any(ipaddress.ip_address(gw) in n for n in networks):
            routes.append(Route(dst.version, MAIN_TABLE, str(dst), ifname, gateway=gw,
                                metric=default_metric(dst.version), proto=RTPROT_BOOT))
    pod = PodFacts(links=links, addrs=tuple(addrs), main_routes=tuple(routes),
                   used_tables=frozenset({MAIN_TABLE, LOCAL_TABLE}))
    return Facts(pod=pod, warnings=("facts derived from prevResult alone: no "
                                    f"{eth0} address and no node facts were known",))


def planning_input(inv: Invocation, facts: Facts) -> Gathered:
    """``Gathered`` for facts read elsewhere (a saved ``facts`` dump, ``assumed_facts``): the
    mode and the attachment derived exactly as ``gather`` derives them."""
    return Gathered(_mode(inv.config, inv.ifname, facts.pod), facts,
                    _attachment(inv.config, inv.ifname, inv.prev_result, inv.container_id,
                                inv.network, facts.pod))
