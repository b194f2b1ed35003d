"""The pure planner: (config, attachment, facts, prior plan) -> Desired.

No I/O, no netlink, no clock: the same inputs always give the same plan, which is what makes
retried ADDs converge, CHECK meaningful and the CLI's ``plan`` trustworthy. docs/routing.md
explains every object produced here; design.md "What the planner produces" is the spec.
"""

from __future__ import annotations

import hashlib
import ipaddress

from cniplugin._version import RTPROT_ROUTE_TUNE
from cniplugin.engine.attachment import Attachment
from cniplugin.protocol.errors import InterfaceNotFound, InvalidConfig, UnsafeRequest
from cniplugin.records.facts import Facts, Link, NodeFacts, PodFacts
from cniplugin.records.objects import (MAIN_TABLE, RESERVED_TABLES, SCOPE_LINK, SCOPE_UNIVERSE,
                                       UNDERLAY_VETH, Desired, KernelObject, LinkAttr, Neighbour,
                                       NftTable, Route, Rule, Sysctl, Veth, connected_metric,
                                       default_dst, default_metric)

__all__ = ["plan", "why_mac_is_kept", "node_veth_name", "planned_mac"]

ETH0_REPLY_TABLE = 100          # overlay: eth0's replies; underlay: replies steered to veth0
FIRST_SECONDARY_TABLE = 101
SOURCE_RULE_PRIORITY = 31000
FWMARK_RULE_PRIORITY = 30000
REPLY_MARK = REPLY_MASK = 0x1   # docs/nft.md: only bit 0 is ours
NODE_VETH_PREFIX = "rt"         # node end: "rt" + the first 11 characters of the container id


def node_veth_name(container_id: str) -> str:
    """The node end of the underlay veth: ``rt`` + the first 11 characters of the container
    id (at most 15 characters). Two containers sharing those 11 characters on one node (for
    hex ids: 1 in 2^44) collide: the second ADD fails with code 103 and the runtime retries
    with a new sandbox."""
    return NODE_VETH_PREFIX + container_id[:11]


def planned_mac(container_id: str, role: str) -> str:
    """A locally administered unicast MAC derived from the container id (same id, same MAC:
    a retried ADD plans the identical pair; an explicit MAC is also one udev leaves alone)."""
    raw = bytearray(hashlib.sha256(f"{container_id}/{role}".encode()).digest()[:6])
    raw[0] = (raw[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


def why_mac_is_kept(link: Link | None) -> str:
    """Why podMACPrefix leaves ``link``'s MAC alone ("" when it rewrites it).

    The prefix exists for interfaces a plugin created in the pod with a random MAC (macvlan).
    A netdev moved into the pod (host-device, sriov) brings the NIC's MAC: an SR-IOV VF's
    spoof check passes only the MAC its PF set, and RoCE derives GIDs from it. A hardware
    netdev has no link kind; host-device keeps the node name in the alias for the way back.
    """
    if link is None:
        return ""
    octets = len(link.mac.split(":")) if link.mac else 6
    if octets != 6:
        return f"has a {octets}-byte hardware address, not an Ethernet MAC"
    if not link.kind:
        return "is a hardware netdev (a NIC or SR-IOV VF moved into the pod)"
    if link.alias:
        return f"was moved into the pod (host-device keeps its node name {link.alias!r})"
    return ""


def plan(config, attachment: Attachment, facts: Facts, prior: Desired | None = None, *,
         mode: str) -> Desired:
    """Everything ``attachment`` needs, in the pod and on the node. Raises on unsafe input.

    ``mode`` is the one the engine resolved while gathering (``engine.mode.resolve_mode``,
    ``overlay`` or ``underlay``): the planner never resolves it itself.
    """
    netk = attachment.ifname
    _validate(config, attachment, facts, mode)
    plan_ = _Plan(config, attachment, facts, prior, mode)
    plan_.build()
    return Desired(
        ifname=netk, table=plan_.table, families=attachment.families,
        host_peer=plan_.peer_name, mode=mode,
        pod_owned=_unique(plan_.pod_owned), pod_shared=_unique(plan_.pod_shared),
        node_owned=_unique(plan_.node_owned), node_shared=_unique(plan_.node_shared),
        displaced=plan_.displaced_routes(), warnings=tuple(plan_.warnings),
    )


def _validate(config, attachment: Attachment, facts: Facts, mode: str) -> None:
    pod, netk, eth0 = facts.pod, attachment.ifname, config.pod_default_cni_nic
    if pod.link(netk) is None:
        raise InterfaceNotFound(f"interface {netk!r} (CNI_IFNAME) is not in the pod netns")
    if pod.link(eth0) is None:
        raise InterfaceNotFound(f"podDefaultCniNic: interface {eth0!r} is not in the pod netns")
    if not attachment.addresses:
        raise InvalidConfig(
            f"no usable IP addresses on {netk!r}: prevResult lists none for it and the link has "
            f"none; route-tune must run after the plugin that configures {netk!r}")
    nic = config.pod_default_route_nic
    if nic and (nic == "lo" or len(nic) > 15 or "/" in nic):
        raise InvalidConfig(f"podDefaultRouteNic: {nic!r} cannot carry a default route")
    node = facts.node
    for cidr in attachment.addresses if node is not None else ():
        ip = str(ipaddress.ip_interface(cidr).ip)
        if ip in node.local_addrs:
            raise UnsafeRequest(
                f"{netk} address {ip} is an address of the node itself; routing it to the pod "
                f"would cut the node off. Fix the IP pool so it excludes node addresses")
        if ip in node.gateways:
            raise UnsafeRequest(
                f"{netk} address {ip} is the node's default gateway; refusing to route it to "
                f"the pod. Fix the IP pool so it excludes the node's gateways")
        holder = dict(node.claims).get(ip)
        if holder:
            raise UnsafeRequest(
                f"{netk} address {ip} is already routed by the node to {holder} (another "
                f"workload has it); routing it to this pod would take that traffic. Fix the IP "
                f"pool so addresses are not handed out twice")
        # Underlay's first interface lives on the node's network by design; any other address
        # there would capture the node's traffic to a neighbour (another node, the API server).
        on_node_network = not (mode == "underlay" and netk == eth0)
        for network in node.own_networks if on_node_network else ():
            if ipaddress.ip_address(ip) in ipaddress.ip_network(network):
                raise UnsafeRequest(
                    f"{netk} address {ip} is on the node's own network {network}; routing it "
                    f"to the pod would capture the node's traffic to that neighbour. Use a "
                    f"rail subnet that is not the node's network")
    _validate_addresses(config, attachment, pod)


def _validate_addresses(config, attachment: Attachment, pod: PodFacts) -> None:
    """Every address must be a unicast address that netK really has (IPAM put it there):
    anything else would install rules and node routes for someone else's address."""
    netk, eth0 = attachment.ifname, config.pod_default_cni_nic
    on_link = {a.address for a in pod.addrs if a.ifname == netk}
    for cidr in attachment.addresses:
        ip = ipaddress.ip_interface(cidr).ip
        if ip.is_unspecified or ip.is_multicast or ip.is_loopback or \
                ip == ipaddress.IPv4Address("255.255.255.255"):
            raise InvalidConfig(f"prevResult: {ip} is not a unicast address; it cannot be "
                                f"{netk}'s")
        if str(ip) in on_link:
            continue
        if netk != eth0 and any(a.address == str(ip) for a in pod.addrs if a.ifname == eth0):
            raise InvalidConfig(f"prevResult: {ip} is {eth0}'s address, not {netk}'s")
        raise InvalidConfig(f"prevResult gives {netk} the address {ip}, but {netk} does not "
                            f"have it: route-tune must run after the plugin that configures "
                            f"{netk}")


def _host(ip: str) -> str:
    address = ipaddress.ip_address(ip)
    return f"{address}/{address.max_prefixlen}"


def _link_scope(family: int) -> str:
    # IPv6 routes have no scope: the kernel reports every one as universe.
    return SCOPE_LINK if family == 4 else SCOPE_UNIVERSE


def _unique(objs: list[KernelObject]) -> tuple[KernelObject, ...]:
    """First object per kernel key wins (the builder adds the most specific first)."""
    seen: dict[tuple, KernelObject] = {}
    for obj in objs:
        seen.setdefault(obj.key(), obj)
    return tuple(seen.values())


def _ours(route: Route, table: int) -> Route:
    # Copies into our tables carry our protocol; IPv6 routes never carry src, a known kernel
    # bug with IPv6 preferred sources (docs/routing.md names it); source selection does it.
    return route.with_(table=table, proto=RTPROT_ROUTE_TUNE,
                       src=route.src if route.family == 4 else "")


class _Plan:
    """One planning run; methods fill the four object lists and the displaced set.

    Overlay: cluster traffic leaves through eth0 (the cluster CNI's veth) and eth0 replies use
    the shared table 100. Underlay: cluster traffic leaves through veth0; the first invocation
    (eth0 itself) creates veth0, the main-table cluster routes, table 100 for replies steered
    by the nft mark, and eth0's own source table, all owned by eth0's attachment; later NICs
    get their own tables as in overlay (docs/underlay.md).
    """

    def __init__(self, config, attachment: Attachment, facts: Facts, prior: Desired | None,
                 mode: str = "overlay"):
        self.config, self.att, self.facts, self.prior = config, attachment, facts, prior
        self.pod: PodFacts = facts.pod
        self.node: NodeFacts | None = facts.node
        self.eth0, self.netk = config.pod_default_cni_nic, attachment.ifname
        self.underlay = mode == "underlay"
        self.first = self.underlay and self.netk == self.eth0
        self.cluster_dev = UNDERLAY_VETH if self.underlay else self.eth0
        self._peer_facts()
        self.table = self._choose_table()
        self.pod_owned: list[KernelObject] = []
        self.pod_shared: list[KernelObject] = []
        self.node_owned: list[KernelObject] = []
        self.node_shared: list[KernelObject] = []
        self.displaced: list[Route] = list(prior.displaced) if prior else []
        self.warnings: list[str] = list(facts.warnings)

    def _peer_facts(self) -> None:
        """Who the node talks to: the host peer's name and MAC, and the pod end's MAC."""
        peer = self.node.host_peer if self.node else None
        if not self.underlay:
            self.peer_name = peer.name if peer else ""
            self.peer_mac = peer.mac if peer else ""
            eth0 = self.pod.link(self.eth0)
            self.pod_end_mac = eth0.mac if eth0 else ""
            return
        # Underlay: live values when the pair exists (a re-ADD keeps what the kernel has, so
        # the PERMANENT neighbours are replaced with the current MACs, never left stale), else
        # the plan's.
        cid = self.att.container_id
        veth = self.pod.link(UNDERLAY_VETH)
        self.peer_name = peer.name if peer else node_veth_name(cid)
        self.peer_mac = peer.mac if peer else planned_mac(cid, "node")
        self.pod_end_mac = veth.mac if veth else planned_mac(cid, "pod")

    # -- table choice -------------------------------------------------------------------
    def _choose_table(self) -> int:
        if self.prior is not None:
            return self.prior.table
        mine = {_host(str(ipaddress.ip_interface(a).ip)) for a in self.att.addresses}
        for rule in self.pod.owned_rules:  # state lost but our rule survived: keep its table
            if rule.priority == SOURCE_RULE_PRIORITY and rule.src in mine \
                    and rule.table >= FIRST_SECONDARY_TABLE:
                return rule.table
        used = set(self.pod.used_tables) | {r.table for r in self.pod.rules} | RESERVED_TABLES
        table = FIRST_SECONDARY_TABLE
        while table in used:
            table += 1
        return table

    # -- top level ----------------------------------------------------------------------
    def build(self) -> None:
        self._link_attrs()
        self._sysctls()
        if self.first:
            self._underlay_infrastructure()
        for family in self.att.families:
            if self.first:
                self._underlay_first(family)
            if self.config.tune_pod_routes:
                self._pod_routes(family)
            self._node_side(family)
        self._displace_collisions()

    def displaced_routes(self) -> tuple[Route, ...]:
        seen, out = set(), []
        for route in self.displaced:
            ident = (route.key(), route.dev, route.gateway)
            if ident not in seen:
                seen.add(ident)
                out.append(route)
        return tuple(out)

    def _link_attrs(self) -> None:
        if self.config.tx_queue_len:
            self.pod_owned.append(LinkAttr(self.netk, "txqlen", str(self.config.tx_queue_len)))
        if self.att.mac:
            why = why_mac_is_kept(self.pod.link(self.netk))
            if why:
                self.warnings.append(f"podMACPrefix not applied: {self.netk} {why}; it keeps "
                                     f"its MAC")
            else:
                self.pod_owned.append(LinkAttr(self.netk, "address", self.att.mac.lower()))

    def _sysctls(self) -> None:
        value = int(self.config.pod_rp_filter)
        if value != -1:
            self.pod_shared.append(Sysctl("net/ipv4/conf/all/rp_filter", str(value)))
            self.pod_owned.append(Sysctl(f"net/ipv4/conf/{self.netk}/rp_filter", str(value)))
        if self.config.pod_arp_isolation:
            # No ARP flux between rails sharing a subnet: netK answers ARP only for its own
            # addresses and asks with its own source. The kernel uses max(all, netK) for both,
            # so netK's values suffice and eth0 keeps its own. Set even on IPv6-only rails:
            # they would otherwise answer for their siblings' IPv4 addresses.
            self.pod_owned += [Sysctl(f"net/ipv4/conf/{self.netk}/arp_ignore", "1"),
                               Sysctl(f"net/ipv4/conf/{self.netk}/arp_announce", "2")]
        if 6 in self.att.families:
            self.pod_shared.append(Sysctl("net/ipv6/conf/all/disable_ipv6", "0"))

    # -- underlay first invocation ------------------------------------------------------
    def _underlay_infrastructure(self) -> None:
        """veth0 (+ its rp_filter: replies to the node arrive there) and the nft table."""
        config, cid = self.config, self.att.container_id
        address = ""
        if config.veth_link_address and self.pod.addrs_of(self.eth0, 4):
            address = f"{config.veth_link_address}/32"  # IPv4 only (what Istio needs)
        self.pod_owned.append(Veth(UNDERLAY_VETH, self.peer_name, int(config.veth_mtu),
                                   self.pod_end_mac, self.peer_mac, address,
                                   alias=f"route-tune:{cid}"))
        value = int(config.pod_rp_filter)
        if value != -1:
            self.pod_owned.append(Sysctl(f"net/ipv4/conf/{UNDERLAY_VETH}/rp_filter", str(value)))
        self.pod_owned.append(NftTable(UNDERLAY_VETH, REPLY_MARK, REPLY_MASK))

    def _underlay_first(self, family: int) -> None:
        """Main: node IPs and cluster CIDRs via veth0 (+ PERMANENT neighbours), policyRoutes;
        table 100 and the fwmark rule for replies to connections that came in via veth0."""
        self.pod_owned += self._cluster_routes(family, MAIN_TABLE)
        self.pod_owned += self._cluster_neighbours(family)
        self.pod_owned += self._policy_routes(family, MAIN_TABLE)
        node_ips = self._node_ips(family)
        if not node_ips or not self.pod.addrs_of(self.eth0, family):
            self.warnings.append(f"no IPv{family} node IP or {self.eth0} address: no IPv{family} "
                                 f"reply steering through {UNDERLAY_VETH}")
            return
        self.pod_owned += self._cluster_routes(family, ETH0_REPLY_TABLE)
        self.pod_owned.append(Route(family, ETH0_REPLY_TABLE, default_dst(family),
                                    UNDERLAY_VETH, gateway=node_ips[0], src=self._eth0_src(family),
                                    metric=default_metric(family)))
        self.pod_owned.append(Rule(family, FWMARK_RULE_PRIORITY, ETH0_REPLY_TABLE,
                                   fwmark=REPLY_MARK, fwmask=REPLY_MASK))

    # -- pod ----------------------------------------------------------------------------
    def _pod_routes(self, family: int) -> None:
        table, netk = self.table, self.netk
        addrs = self.att.addresses_of(family)
        gateway = self.att.gateway_of(family)
        metric = default_metric(family)
        # Table T, most specific first (_unique keeps the first per key).
        for addr in addrs:
            self.pod_owned.append(Route(family, table, str(addr.network), netk,
                                        scope=_link_scope(family),
                                        src=str(addr.ip) if family == 4 else "",
                                        metric=connected_metric(family)))
        self.pod_owned += self._cluster_routes(family, table)
        self.pod_owned += self._policy_routes(family, table)
        self.pod_owned += self._copies(netk, family, table)
        if self.underlay and not self.first:
            # eth0's connected subnets: docs/underlay.md, "Later invocations"
            self.pod_owned += self._copies(self.eth0, family, table, connected_only=True)
        if gateway:
            self.pod_owned.append(Route(family, table, default_dst(family), netk,
                                        gateway=gateway, metric=metric))
        else:
            self.warnings.append(f"{netk} has no IPv{family} gateway: table {table} has no "
                                 f"default route; other destinations fall through to main")
        for addr in addrs:
            self.pod_owned.append(Rule(family, SOURCE_RULE_PRIORITY, table, _host(str(addr.ip))))
        if self.first:
            return  # eth0 keeps its main default; main cluster routes: _underlay_first
        if not self.underlay:
            self._eth0_reply_table(family)
            self.pod_shared += self._cluster_routes(family, MAIN_TABLE)
            self.pod_shared += self._cluster_neighbours(family)
        self._main_default(family, gateway)

    def _copies(self, dev: str, family: int, table: int, *,
                connected_only: bool = False) -> list[Route]:
        """Copies into ``table`` of ``dev``'s main-table routes that are not ours, not a default
        and not link-local (``fe80::/64``, multicast).

        ``connected_only``: only routes without a gateway. Underlay rail tables copy eth0's
        connected subnets, where the pods' eth0 addresses live (no cluster CIDR can name them:
        main has eth0's connected route), so a rail-bound source reaches another pod's eth0
        through eth0; a route via a gateway could cover the rail fabric's own subnets.
        """
        return [_ours(route, table) for route in self.pod.main_routes_of(dev, family)
                if route.proto != RTPROT_ROUTE_TUNE and not route.is_default
                and not _is_link_local_prefix(route.dst)
                and not (connected_only and route.gateway)]

    def _policy_routes(self, family: int, table: int) -> list[Route]:
        out = []
        for policy in self.config.policy_routes or ():
            dst = ipaddress.ip_network(str(policy.dst), strict=False)
            if dst.version == family:
                out.append(Route(family, table, str(dst), self.netk, gateway=str(policy.gw),
                                 metric=default_metric(family)))
        return out

    def _eth0_src(self, family: int) -> str:
        if family == 6:
            return ""
        v4 = self.pod.addrs_of(self.eth0, 4)
        return v4[0].address if v4 else ""

    def _node_ips(self, family: int) -> list[str]:
        if self.node is None:
            return []
        return [ip for ip in self.node.node_ips if ipaddress.ip_address(ip).version == family]

    def _cluster_routes(self, family: int, table: int) -> list[Route]:
        """Node IPs and cluster CIDRs via the cluster device (eth0 in overlay, veth0 in
        underlay), for main or a pod table."""
        if not self.pod.addrs_of(self.eth0, family):
            if table == MAIN_TABLE:
                self.warnings.append(f"{self.eth0} has no IPv{family} address: no IPv{family} "
                                     f"cluster routes")
            return []
        node_ips, src, dev = self._node_ips(family), self._eth0_src(family), self.cluster_dev
        routes = [Route(family, table, _host(ip), dev, scope=_link_scope(family), src=src,
                        metric=default_metric(family)) for ip in node_ips]
        cidrs = [ipaddress.ip_network(str(c), strict=False) for c in (
            *(self.config.overlay_pod_cidr or ()), *(self.config.service_cidr or ()),
            *(self.config.hijack_cidr or ()))]
        cidrs = [c for c in cidrs if c.version == family]
        if cidrs and not node_ips:
            if table == MAIN_TABLE:
                self.warnings.append(f"no IPv{family} node IP to route cluster CIDRs through")
            return routes
        for cidr in cidrs:
            routes.append(Route(family, table, str(cidr), dev, gateway=node_ips[0],
                                src=src, metric=default_metric(family)))
        return routes

    def _cluster_neighbours(self, family: int) -> list[Neighbour]:
        if self.node is None or not self.pod.addrs_of(self.eth0, family) or not self.peer_mac:
            return []
        return [Neighbour(family, self.cluster_dev, ip, self.peer_mac)
                for ip in self._node_ips(family)]

    def _eth0_defaults(self, family: int) -> list[Route]:
        """eth0's default route(s): live in main, else displaced earlier, else our table-100 copy."""
        def defaults(routes):
            return [r for r in routes if r.family == family and r.dev == self.eth0 and r.is_default]
        return (defaults(r for r in self.pod.main_routes if r.proto != RTPROT_ROUTE_TUNE)
                or defaults(self.displaced)
                or defaults(r for r in self.pod.owned_routes if r.table == ETH0_REPLY_TABLE))

    def _eth0_reply_table(self, family: int) -> None:
        defaults = self._eth0_defaults(family)
        eth0_addrs = self.pod.addrs_of(self.eth0, family)
        if not defaults or not eth0_addrs:
            self.warnings.append(f"{self.eth0} has no IPv{family} default route or address: "
                                 f"no reply table {ETH0_REPLY_TABLE} for IPv{family}")
            return
        for default in defaults:
            gw = ipaddress.ip_address(default.gateway) if default.gateway else None
            for route in self.pod.main_routes_of(self.eth0, family):
                if gw and not route.gateway and not route.is_default \
                        and gw in ipaddress.ip_network(route.dst):
                    self.pod_shared.append(_ours(route, ETH0_REPLY_TABLE))
            self.pod_shared.append(_ours(default, ETH0_REPLY_TABLE))
        for addr in eth0_addrs:
            self.pod_shared.append(Rule(family, SOURCE_RULE_PRIORITY, ETH0_REPLY_TABLE,
                                        _host(addr.address)))

    def _main_default(self, family: int, gateway: str) -> None:
        """Only podDefaultRouteNic (default: eth0) keeps a default route in main (outcome 3)."""
        nic = self.config.pod_default_route_nic or self.eth0
        foreign = [r for r in self.pod.main_routes
                   if r.family == family and r.is_default and r.proto != RTPROT_ROUTE_TUNE]
        self.displaced += [r for r in foreign if r.dev == self.netk]
        if nic != self.netk:
            if nic != self.eth0 and self.pod.link(nic) is None:
                self.warnings.append(f"podDefaultRouteNic {nic!r} is not in the pod yet: the "
                                     f"default stays on {self.eth0} until {nic!r} is attached")
            return
        if not gateway:
            self.warnings.append(f"podDefaultRouteNic {nic!r} has no IPv{family} gateway: the "
                                 f"IPv{family} default stays where it is")
            return
        self.displaced += [r for r in foreign if r.dev == self.eth0]
        self.pod_owned.append(Route(family, MAIN_TABLE, default_dst(family), self.netk,
                                    gateway=gateway, metric=default_metric(family)))

    def _displace_collisions(self) -> None:
        """A foreign main route with the key of one of ours would be overwritten: record it."""
        ours = {o.key() for o in (*self.pod_owned, *self.pod_shared)
                if isinstance(o, Route) and o.table == MAIN_TABLE}
        self.displaced += [r for r in self.pod.main_routes
                           if r.proto != RTPROT_ROUTE_TUNE and r.key() in ours]

    # -- node ---------------------------------------------------------------------------
    def _node_side(self, family: int) -> None:
        """hostRuleTable routes and PERMANENT neighbours for netK's addresses via the host peer
        (overlay: eth0's Calico-side veth; underlay: veth0's node end)."""
        if self.node is None:
            return
        config = self.config
        self.node_shared.append(Rule(family, int(config.host_rule_priority),
                                     int(config.host_rule_table)))
        for addr in self.att.addresses_of(family):
            self.node_owned.append(Route(family, int(config.host_rule_table), _host(str(addr.ip)),
                                         self.peer_name, scope=_link_scope(family),
                                         metric=default_metric(family)))
            self.node_owned.append(Neighbour(family, self.peer_name, str(addr.ip),
                                             self.pod_end_mac))


def _is_link_local_prefix(dst: str) -> bool:
    network = ipaddress.ip_network(dst)
    return network.version == 6 and (network.is_link_local or network.is_multicast)
