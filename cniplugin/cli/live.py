"""Live-state reading and classification for the CLI's show / explain / verify / orphans / facts.

The engine's adapter (``_netlink``) reads only what the planner needs (lookup rules with a
source, unicast routes). An operator needs everything: ``goto``/``unreachable`` rules,
``iif``/``fwmark`` selectors, blackhole and local routes. This module reads those through the
adapter's session (``_netlink.session(fd).ipr``), never opening pyroute2 itself, and turns them
into plain values that ``_render`` prints. Planning and checking are never redone here: drift
comes from ``_engine.diff_state``, plans from ``_engine.plan_for``; ``_explain`` walks rules.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import asdict, dataclass, field

from cniplugin.kernel import netlink as _netlink
from cniplugin.kernel import netns as _netns
from cniplugin.protocol.errors import CNIError
from cniplugin.engine.facts import Addr, Facts, Link
from cniplugin.engine.objects import Neighbour
from cniplugin.engine.store import AttachmentState, Store
from cniplugin._version import RTPROT_ROUTE_TUNE

LOCAL_TABLE, MAIN_TABLE, DEFAULT_TABLE = 255, 254, 253
RESERVED_TABLES = frozenset({0, DEFAULT_TABLE, MAIN_TABLE, LOCAL_TABLE})
TABLE_NAMES = {LOCAL_TABLE: "local", MAIN_TABLE: "main", DEFAULT_TABLE: "default"}
PROTO_NAMES = {0: "unspec", 1: "redirect", 2: "kernel", 3: "boot", 4: "static", 16: "dhcp",
               RTPROT_ROUTE_TUNE: "route-tune"}
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_ROUTE_TYPES = {1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast",
                6: "blackhole", 7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat"}
_RULE_ACTIONS = {1: "lookup", 2: "goto", 3: "nop", 6: "blackhole", 7: "unreachable",
                 8: "prohibit"}
_SCOPES = {0: "universe", 200: "site", 253: "link", 254: "host", 255: "nowhere"}
FIB_RULE_INVERT, FIB_RULE_UNRESOLVED = 0x2, 0x4
RTNH_F_DEAD = 0x1
NUD_PERMANENT = 0x80
NO_SUPPRESS = 0xFFFFFFFF


def table_name(table: int) -> str:
    return TABLE_NAMES.get(table, str(table))


def owner_of(proto: int) -> str:
    """``route-tune`` for protocol 231, else ``foreign``."""
    return "route-tune" if proto == RTPROT_ROUTE_TUNE else "foreign"


# -- live objects ------------------------------------------------------------------------
@dataclass(frozen=True)
class LiveRule:
    """One policy rule with every selector the kernel matches on."""

    family: int
    priority: int
    action: str                      # lookup | goto | nop | blackhole | unreachable | prohibit
    table: int = 0
    goto: int = 0
    src: str = ""                    # "ip/len"; "" = from all
    dst: str = ""
    iif: str = ""
    oif: str = ""
    fwmark: int = 0
    fwmask: int = 0
    invert: bool = False
    unresolved: bool = False         # a goto whose target rule does not exist
    suppress_prefixlen: int | None = None
    proto: int = 0
    other: tuple[str, ...] = ()      # selectors explain cannot feed (tos, ipproto, ports, uid)

    @property
    def owned(self) -> bool:
        return self.proto == RTPROT_ROUTE_TUNE

    def key(self) -> tuple:
        """Same shape as ``_objects.Rule.key()`` (only meaningful for lookup rules)."""
        key = ("rule", self.family, self.priority, self.src or "all", self.table)
        return key + (self.fwmark, self.fwmask) if self.fwmark else key

    def text(self) -> str:
        """As ``ip rule show`` prints it."""
        words = [f"{self.priority}:", "not" if self.invert else "",
                 f"from {_short(self.src) if self.src else 'all'}"]
        words += [f"to {_short(self.dst)}"] if self.dst else []
        if self.fwmark or self.fwmask:
            words.append(f"fwmark {self.fwmark:#x}" + (
                f"/{self.fwmask:#x}" if self.fwmask != 0xFFFFFFFF else ""))
        words += [f"iif {self.iif}"] if self.iif else []
        words += [f"oif {self.oif}"] if self.oif else []
        words += list(self.other)
        if self.action == "lookup":
            words.append(f"lookup {table_name(self.table)}")
            if self.suppress_prefixlen is not None:
                words.append(f"suppress_prefixlength {self.suppress_prefixlen}")
        elif self.action == "goto":
            words.append(f"goto {self.goto}" + (" [unresolved]" if self.unresolved else ""))
        else:
            words.append(self.action)
        if self.proto and self.proto != 2:  # iproute2 hides "proto kernel" on rules too
            words.append(f"proto {PROTO_NAMES.get(self.proto, self.proto)}"
                         if self.proto != RTPROT_ROUTE_TUNE else "proto 231")
        return " ".join(w for w in words if w)

    def to_json(self) -> dict:
        return {**asdict(self), "other": list(self.other), "text": self.text(),
                "owner": owner_of(self.proto)}


@dataclass(frozen=True)
class LiveRoute:
    """One route of any type, in any table (multipath legs kept together)."""

    family: int
    table: int
    type: str
    dst: str                         # canonical "ip/len"
    dev: str = ""
    gateway: str = ""
    scope: str = "universe"
    src: str = ""
    metric: int = 0
    proto: int = 0
    nexthops: tuple[tuple[str, str], ...] = ()   # ECMP legs: (dev, gateway)
    dead: bool = False

    @property
    def owned(self) -> bool:
        return self.proto == RTPROT_ROUTE_TUNE

    @property
    def network(self):
        return ipaddress.ip_network(self.dst)

    @property
    def is_default(self) -> bool:
        return self.network.prefixlen == 0

    def key(self) -> tuple:
        """Same shape as ``_objects.Route.key()``."""
        return ("route", self.family, self.table, self.dst, self.metric)

    def text(self) -> str:
        """As ``ip route show table X`` prints it (without the table)."""
        dst = "default" if self.is_default else _short(self.dst)
        words = [] if self.type == "unicast" else [self.type]
        words.append(dst)
        if self.nexthops:
            words += ["nexthop" + (f" via {gw}" if gw else "") + f" dev {dev}"
                      for dev, gw in self.nexthops]
        else:
            words += [f"via {self.gateway}"] if self.gateway else []
            words += [f"dev {self.dev}"] if self.dev else []
        if self.proto not in (0, 3):  # iproute2 hides "proto boot"
            name = self.proto if self.owned else PROTO_NAMES.get(self.proto, self.proto)
            words.append(f"proto {name}")
        if self.scope != "universe":
            words.append(f"scope {self.scope}")
        words += [f"src {self.src}"] if self.src else []
        words += [f"metric {self.metric}"] if self.metric else []
        words += ["dead"] if self.dead else []
        return " ".join(words)

    def to_json(self) -> dict:
        return {**asdict(self), "nexthops": [list(n) for n in self.nexthops],
                "text": self.text(), "owner": owner_of(self.proto)}


@dataclass(frozen=True)
class LiveNeighbour:
    family: int
    dev: str
    ip: str
    lladdr: str
    permanent: bool
    proto: int = 0

    @property
    def owned(self) -> bool:
        return self.proto == RTPROT_ROUTE_TUNE

    def key(self) -> tuple:
        return ("neigh", self.dev, self.ip)

    def text(self) -> str:
        words = [self.ip, f"dev {self.dev}", f"lladdr {self.lladdr}" if self.lladdr else "",
                 "PERMANENT" if self.permanent else "",
                 f"proto {self.proto}" if self.proto else ""]
        return " ".join(w for w in words if w)

    def to_json(self) -> dict:
        return {**asdict(self), "text": self.text(), "owner": owner_of(self.proto)}


@dataclass
class Snapshot:
    """Everything routing-related in one netns."""

    inode: int
    links: list[Link]
    addrs: list[Addr]
    rules: list[LiveRule]
    routes: list[LiveRoute]
    neighbours: list[LiveNeighbour]

    def rules_of(self, family: int) -> list[LiveRule]:
        return [r for r in self.rules if r.family == family]

    def routes_in(self, table: int, family: int | None = None) -> list[LiveRoute]:
        return [r for r in self.routes if r.table == table
                and (family is None or r.family == family)]

    def addrs_of(self, ifname: str) -> list[Addr]:
        return [a for a in self.addrs if a.ifname == ifname]

    def local_ips(self) -> set[str]:
        return {a.address for a in self.addrs}


# -- reading -------------------------------------------------------------------------------
def _short(prefix: str) -> str:
    """``1.2.3.4/32`` -> ``1.2.3.4`` (as ip prints host prefixes)."""
    net = ipaddress.ip_network(prefix, strict=False)
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def _rule(msg, family: int) -> LiveRule:
    attr = msg.get_attr
    src, dst = attr("FRA_SRC"), attr("FRA_DST")
    other = []
    if msg["tos"]:
        other.append(f"tos {msg['tos']:#x}")
    if attr("FRA_IP_PROTO"):
        other.append(f"ipproto {attr('FRA_IP_PROTO')}")
    for name, word in (("FRA_SPORT_RANGE", "sport"), ("FRA_DPORT_RANGE", "dport")):
        rng = attr(name)
        if rng:
            other.append(f"{word} {rng.get('start')}-{rng.get('end')}")
    uid = attr("FRA_UID_RANGE")
    if uid and (uid.get("start"), uid.get("end")) != (0, 0xFFFFFFFF):
        other.append(f"uidrange {uid.get('start')}-{uid.get('end')}")
    if attr("FRA_L3MDEV"):
        other.append("l3mdev")
    mark = attr("FRA_FWMARK") or 0
    mask = attr("FRA_FWMASK")
    suppress = attr("FRA_SUPPRESS_PREFIXLEN")
    return LiveRule(
        family=family, priority=attr("FRA_PRIORITY") or 0,
        action=_RULE_ACTIONS.get(msg["action"], f"action{msg['action']}"),
        table=attr("FRA_TABLE") or msg["table"], goto=attr("FRA_GOTO") or 0,
        src=f"{src}/{msg['src_len']}" if src else "",
        dst=f"{dst}/{msg['dst_len']}" if dst else "",
        iif=attr("FRA_IIFNAME") or "", oif=attr("FRA_OIFNAME") or "",
        fwmark=mark, fwmask=mask if mask is not None else (0xFFFFFFFF if mark else 0),
        invert=bool(msg["flags"] & FIB_RULE_INVERT),
        unresolved=bool(msg["flags"] & FIB_RULE_UNRESOLVED),
        suppress_prefixlen=None if suppress in (None, NO_SUPPRESS, -1) else suppress,
        proto=attr("FRA_PROTOCOL") or 0, other=tuple(other))


def _route(msg, family: int, names: dict[int, str]) -> LiveRoute:
    attr = msg.get_attr
    dst = attr("RTA_DST")
    dst = str(ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)) if dst else (
        "::/0" if family == 6 else "0.0.0.0/0")
    legs = attr("RTA_MULTIPATH")
    hops = tuple((names.get(leg["oif"], str(leg["oif"])), leg.get_attr("RTA_GATEWAY") or "")
                 for leg in legs) if legs else ()
    dead = bool(msg["flags"] & RTNH_F_DEAD) or (bool(legs) and all(
        leg["flags"] & RTNH_F_DEAD for leg in legs))
    oif = attr("RTA_OIF")
    return LiveRoute(
        family=family, table=attr("RTA_TABLE") or msg["table"],
        type=_ROUTE_TYPES.get(msg["type"], str(msg["type"])), dst=dst,
        dev=names.get(oif, str(oif)) if oif else "", gateway=attr("RTA_GATEWAY") or "",
        scope=_SCOPES.get(msg["scope"], str(msg["scope"])), src=attr("RTA_PREFSRC") or "",
        metric=attr("RTA_PRIORITY") or 0, proto=msg["proto"], nexthops=hops, dead=dead)


def read_rules(nl) -> list[LiveRule]:
    return [_rule(m, fam) for fam in (4, 6) for m in nl.ipr.rule("dump", family=_AF[fam])]


def read_routes(nl, table: int | None = None) -> list[LiveRoute]:
    names = {link.index: link.name for link in nl.links()}
    filters = {} if table is None else {"table": table}
    return [_route(m, fam, names) for fam in (4, 6)
            for m in nl.ipr.route("dump", family=_AF[fam], **filters)]


def read_neighbours(nl, dev: str | None = None) -> list[LiveNeighbour]:
    """Configured neighbours only: PERMANENT ones, or any carrying a protocol tag."""
    links = nl.links()
    names = {link.index: link.name for link in links}
    index = next((link.index for link in links if link.name == dev), None)
    if dev is not None and index is None:
        return []
    out = []
    for fam in (4, 6):
        filters = {"ifindex": index} if index is not None else {}
        for msg in nl.ipr.neigh("dump", family=_AF[fam], **filters):
            permanent = bool(msg["state"] & NUD_PERMANENT)
            proto = msg.get_attr("NDA_PROTOCOL") or 0
            if msg.get_attr("NDA_DST") is None or not (permanent or proto):
                continue
            out.append(LiveNeighbour(fam, names.get(msg["ifindex"], ""),
                                     str(ipaddress.ip_address(msg.get_attr("NDA_DST"))),
                                     msg.get_attr("NDA_LLADDR") or "", permanent, proto))
    return sorted(out, key=lambda n: (n.family, n.dev, ipaddress.ip_address(n.ip)))


def snapshot(fd: int | None) -> Snapshot:
    """Read a whole netns (``fd``; None = the calling thread's netns)."""
    with _netlink.session(fd) as nl:
        return Snapshot(inode=netns_inode(fd), links=nl.links(), addrs=nl.addresses(),
                        rules=read_rules(nl), routes=read_routes(nl),
                        neighbours=read_neighbours(nl))


def netns_inode(fd: int | None) -> int:
    if fd is not None:
        return _netns.inode(fd)
    home = _netns.current_netns()
    try:
        return _netns.inode(home)
    finally:
        os.close(home)


# -- netns and state lookup --------------------------------------------------------------
class NotFound(Exception):
    """The netns or pod named on the command line does not exist (exit 3)."""


def resolve_netns(name: str, store: Store | None = None) -> str:
    """NAME (``/run/netns/NAME``), a path, or a container id with a state file -> a path."""
    if "/" in name:
        candidates = [name]
    else:
        candidates = [f"/run/netns/{name}", f"/var/run/netns/{name}"]
    for path in candidates:
        if os.path.exists(path):
            return path
    if store is not None and "/" not in name:
        for state in store.all():
            if state.container_id == name and state.netns and os.path.exists(state.netns):
                return state.netns
    raise NotFound(f"network namespace {name!r} not found (tried {', '.join(candidates)}"
                   + (", and the container ids of the state files)" if store else ")"))


def open_netns(path: str) -> int:
    """Open a netns path; NotFound (exit 3) if it is missing or not a network namespace."""
    try:
        return _netns.open_netns(path)
    except (FileNotFoundError, NotADirectoryError) as err:
        raise NotFound(f"{path} is not a network namespace ({err.strerror or err})") from None


def states_of_pod(store: Store, pod_inode: int) -> list[AttachmentState]:
    """Every attachment state recorded for the pod netns with inode ``pod_inode``."""
    return [s for s in store.all() if s.netns_inode == pod_inode]


def state_file(store: Store, state: AttachmentState) -> str:
    return store.path(state.container_id, state.ifname)


def state_drift(state: AttachmentState, pod_fd: int, node_fd: int | None):
    """``_engine.diff_state`` (the engine's CHECK) for one recorded attachment."""
    from cniplugin.engine import commands as _engine
    if node_fd is not None:
        return _engine.diff_state(state, pod_fd, node_fd)
    home = _netns.current_netns()
    try:
        return _engine.diff_state(state, pod_fd, home)
    finally:
        os.close(home)


# -- facts (what the planner sees) -------------------------------------------------------
def gather_facts(pod_fd: int, node_fd: int | None, eth0: str = "eth0") -> Facts:
    """The planner's facts, from the engine's one gatherer (``engine.gather``), as a next ADD
    would see them. Node facts are best effort: outside the pod's node netns they are None and
    the reason is a warning (the plan then has no node side and says so)."""
    from cniplugin.engine.gather import gather_facts as gather
    from cniplugin.protocol.config import PluginConfig
    return gather(pod_fd, node_fd, PluginConfig.model_validate({"podDefaultCniNic": eth0}))


# -- show --------------------------------------------------------------------------------
@dataclass
class Problem:
    kind: str       # empty-table | unreachable-table | no-default | state-drift | untracked | ...
    message: str

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class InterfaceView:
    link: Link
    addrs: list[Addr]
    rules: list[LiveRule] = field(default_factory=list)
    tables: dict[int, list[LiveRoute]] = field(default_factory=dict)
    main_routes: list[LiveRoute] = field(default_factory=list)
    neighbours: list[LiveNeighbour] = field(default_factory=list)


@dataclass
class NodeView:
    """The node-side entries for one pod."""

    inode: int
    host_peer: str
    host_rule_tables: list[int]
    rules: list[LiveRule]
    routes: list[LiveRoute]
    neighbours: list[LiveNeighbour]
    note: str = ""


@dataclass
class PodView:
    netns: str
    snap: Snapshot
    interfaces: list[InterfaceView]
    other_rules: list[LiveRule]
    other_tables: dict[int, list[LiveRoute]]
    attachments: list[AttachmentState]
    state_dir: str
    problems: list[Problem]
    node: NodeView | None = None
    facts: Facts | None = None       # the planner's view (``plan --facts`` accepts show --json)


def _tables_by_interface(snap: Snapshot) -> dict[int, str]:
    """Table -> interface: the interface whose address a ``from <ip> lookup T`` rule names."""
    owner_ip = {a.address: a.ifname for a in snap.addrs}
    out: dict[int, str] = {}
    for rule in snap.rules:
        if rule.action == "lookup" and rule.src and rule.table not in RESERVED_TABLES:
            ip = rule.src.split("/")[0]
            if ip in owner_ip:
                out.setdefault(rule.table, owner_ip[ip])
    return out


def build_pod_view(netns: str, pod_fd: int, store: Store, node_fd: int | None,
                   with_node: bool, host_rule_table: int, eth0: str) -> PodView:
    snap = snapshot(pod_fd)
    attachments = states_of_pod(store, snap.inode)
    owner = _tables_by_interface(snap)
    views = {link.name: InterfaceView(link, [a for a in snap.addrs_of(link.name)])
             for link in snap.links if link.name != "lo"}
    other_rules = []
    for rule in snap.rules:
        view = views.get(owner.get(rule.table, "")) if rule.action == "lookup" else None
        (view.rules if view else other_rules).append(rule)
    other_tables: dict[int, list[LiveRoute]] = {}
    for route in snap.routes:
        if route.table == LOCAL_TABLE:
            continue
        if route.table == MAIN_TABLE:
            first_leg = route.nexthops[0][0] if route.nexthops else ""
            view = views.get(route.dev) or views.get(first_leg)
            if view:
                view.main_routes.append(route)
                continue
        view = views.get(owner.get(route.table, ""))
        if view:
            view.tables.setdefault(route.table, []).append(route)
        else:
            other_tables.setdefault(route.table, []).append(route)
    for neigh in snap.neighbours:
        if neigh.dev in views:
            views[neigh.dev].neighbours.append(neigh)
    problems = routing_problems(snap)
    problems += _state_problems(store, snap, attachments, pod_fd, node_fd, with_node)
    node = None
    if with_node:
        node, node_problems = build_node_view(pod_fd, node_fd, attachments, host_rule_table,
                                              eth0)
        problems += node_problems
    ordered = sorted(views.values(), key=lambda v: (v.link.name != eth0, v.link.index))
    try:
        facts = gather_facts(pod_fd, node_fd, eth0)
    except CNIError:
        facts = None
    return PodView(netns, snap, ordered, other_rules, other_tables, attachments,
                   os.path.dirname(store.root), problems, node, facts)


def routing_problems(snap: Snapshot) -> list[Problem]:
    """What looks wrong in the pod's policy routing, whoever installed it."""
    problems = []
    owner = _tables_by_interface(snap)
    for family in (4, 6):
        v = f"IPv{family}"
        rules = snap.rules_of(family)
        looked_up = {r.table for r in rules if r.action == "lookup"}
        for rule in rules:
            if rule.action == "lookup" and rule.table not in RESERVED_TABLES \
                    and not snap.routes_in(rule.table, family):
                problems.append(Problem("empty-table", f"rule `{rule.text()}` points at {v} "
                                        f"table {rule.table}, which is empty"))
        tables = {r.table for r in snap.routes if r.family == family}
        for table in sorted(tables - looked_up - {LOCAL_TABLE}):
            problems.append(Problem("unreachable-table", f"{v} table {table_name(table)} has "
                                    f"routes but no rule looks it up"))
        for table, ifname in sorted(owner.items()):
            routes = snap.routes_in(table, family)
            sources = [r.src for r in rules if r.action == "lookup" and r.table == table and r.src]
            if routes and sources and not any(r.is_default for r in routes):
                problems.append(Problem("no-default", f"{ifname}: {v} table {table} (selected by "
                                        f"from {', '.join(_short(s) for s in sources)}) has no "
                                        f"default route; traffic from it to other destinations "
                                        f"falls through to main"))
    return problems


def _state_problems(store: Store, snap: Snapshot, attachments: list[AttachmentState],
                    pod_fd: int, node_fd: int | None, with_node: bool) -> list[Problem]:
    problems = []
    state_dir = os.path.dirname(store.root)
    node_inode = netns_inode(node_fd)
    listed: set[tuple] = set()
    for state in attachments:
        listed |= {o.key() for o in state.desired.pod_objects()}
        where = f"attachment {state.container_id}/{state.ifname}"
        if state.phase != "applied":
            problems.append(Problem("state-phase", f"{where}: state is {state.phase!r} (an ADD "
                                    f"did not finish; a DEL or a retried ADD cleans up)"))
        try:
            drifts = state_drift(state, pod_fd, node_fd)
        except CNIError as err:
            problems.append(Problem("state-drift", f"{where}: cannot compare: {err.msg}"))
            continue
        for drift in drifts:
            if drift.side == "node" and not (with_node and state.node_inode == node_inode):
                continue
            problems.append(Problem("state-drift", f"{where} (network {state.network}): "
                                    f"{drift.describe()}"))
    owned = [o for o in (*snap.rules, *snap.routes, *snap.neighbours) if o.owned]
    for obj in owned:
        if obj.key() not in listed:
            problems.append(Problem("untracked", f"`{obj.text()}` carries route-tune's protocol "
                                    f"but no state file in {state_dir} lists it"))
    return problems


def host_peer_name(pod_fd: int, node_fd: int | None, eth0: str) -> tuple[str, str]:
    """(host peer name, "") or ("", why not): the verified node end of pod eth0."""
    try:
        facts = gather_facts(pod_fd, node_fd, eth0)
    except CNIError as err:
        return "", err.msg
    if facts.node is None or facts.node.host_peer is None:
        return "", "; ".join(facts.warnings) or "no host peer (underlay veth not created yet)"
    return facts.node.host_peer.name, ""


def build_node_view(pod_fd: int, node_fd: int | None, attachments: list[AttachmentState],
                    host_rule_table: int, eth0: str) -> tuple[NodeView, list[Problem]]:
    node_inode = netns_inode(node_fd)
    mine = [s for s in attachments if s.node_inode == node_inode]
    peer, why = host_peer_name(pod_fd, node_fd, eth0)
    peer = peer or next((s.desired.host_peer for s in mine if s.desired.host_peer), "")
    tables = sorted({o.table for s in mine for o in s.desired.node_shared} or {host_rule_table})
    with _netlink.session(node_fd) as nl:
        rules = [r for r in read_rules(nl) if r.action == "lookup" and r.table in tables]
        routes = [r for t in tables for r in read_routes(nl, table=t)
                  if peer and (r.dev == peer or any(d == peer for d, _ in r.nexthops))]
        neighbours = read_neighbours(nl, dev=peer) if peer else []
    note = ""
    if why:
        note = f"host peer not verified here: {why}"
    if attachments and not mine:
        note += ("; " if note else "") + "the state files were written in another node netns"
    problems = []
    if not peer and not mine:
        note += "; nothing to show: run on the pod's node or give --node-netns"
    elif not rules:
        problems.append(Problem("node-rule", f"no node rule looks up hostRuleTable "
                                f"{', '.join(map(str, tables))}: the node cannot reach the "
                                f"pod's rail addresses"))
    return NodeView(node_inode, peer, tables, rules, routes, neighbours, note), problems


# -- orphans -----------------------------------------------------------------------------
@dataclass
class Orphans:
    node_inode: int
    state_dir: str
    tables: list[int]
    objects: list                    # LiveRule | LiveRoute | LiveNeighbour, unreferenced
    stale_states: list[tuple[AttachmentState, str]]   # (state, why it is stale)
    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def stale_reason(state: AttachmentState) -> str:
    """Why a state file's pod is gone ("" when the pod netns still exists)."""
    if not state.netns:
        return "it records no netns path"
    try:
        fd = _netns.open_netns(state.netns)
    except (FileNotFoundError, NotADirectoryError):
        return f"its netns {state.netns} no longer exists"
    except PermissionError:
        return ""  # cannot tell: treat the pod as alive
    try:
        if _netns.inode(fd) != state.netns_inode:
            return f"{state.netns} now names another network namespace"
    finally:
        os.close(fd)
    return ""


def find_orphans(store: Store, node_fd: int | None, host_rule_tables: set[int]) -> Orphans:
    """route-tune's node objects no state file lists, and state files whose pod is gone."""
    node_inode = netns_inode(node_fd)
    states = list(store.all())
    here = [s for s in states if s.node_inode == node_inode]
    listed = {o.key() for s in here for o in s.desired.node_objects()}
    tables = set(host_rule_tables) | {o.table for s in here for o in s.desired.node_shared}
    with _netlink.session(node_fd) as nl:
        rules = [r for r in read_rules(nl) if r.owned]
        tables |= {r.table for r in rules if r.action == "lookup"}
        routes = [r for t in sorted(tables) for r in read_routes(nl, table=t) if r.owned]
        neighbours = [n for n in read_neighbours(nl) if n.owned]
    objects = [o for o in (*rules, *routes, *neighbours) if o.key() not in listed]
    stale = [(s, why) for s in states if (why := stale_reason(s))]
    return Orphans(node_inode, os.path.dirname(store.root), sorted(tables), objects, stale)


def remove_orphans(found: Orphans, store: Store, node_fd: int | None) -> None:
    """Clean up what ``find_orphans`` found: stale states through the engine's DEL (node side
    only: their pod is gone), then unreferenced objects, re-checked under the node lock."""
    from cniplugin.engine import commands as _engine
    from cniplugin.engine.invocation import Invocation
    from cniplugin.engine.objects import Route, Rule

    for state, _why in found.stale_states:
        inv = Invocation("DEL", state.container_id, state.ifname, "", state.network, "",
                         found.state_dir, node_netns_fd=node_fd)
        try:
            _engine.cmd_del(inv)
            found.removed.append(f"state {state_file(store, state)} (and its node entries)")
        except CNIError as err:
            found.errors.append(f"{state.container_id}/{state.ifname}: {err.msg}")
    with _netns.node_lock(node_fd):
        # Re-read under the lock: an ADD writes its state before it touches the node.
        again = find_orphans(store, node_fd, set(found.tables))
        with _netlink.session(node_fd) as nl:
            for obj in again.objects:
                if isinstance(obj, LiveRule):
                    kernel_obj = Rule(obj.family, obj.priority, obj.table, obj.src,
                                      fwmark=obj.fwmark, fwmask=obj.fwmask)
                elif isinstance(obj, LiveRoute):
                    kernel_obj = Route(obj.family, obj.table, obj.dst, obj.dev, obj.gateway,
                                       obj.scope, obj.src, obj.metric)
                else:
                    kernel_obj = Neighbour(obj.family, obj.dev, obj.ip, obj.lladdr)
                try:
                    nl.remove(kernel_obj)
                    found.removed.append(obj.text())
                except CNIError as err:
                    found.errors.append(f"{obj.text()}: {err.msg}")
