"""``cni-route-tune show``: a pod's routing grouped by interface, and what looks wrong in it.

Objects are the engine's own (``records.objects``), read by ``cli.live``; drift comes from the engine's
CHECK (``live.state_drift``). ``render`` prints the views.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from cniplugin.cli.iptext import short, text
from cniplugin.cli.live import (Snapshot, gather_facts, netns_inode, read_neighbours,
                                read_routes, read_rules, snapshot, state_drift, states_of_pod)
from cniplugin.records.facts import Addr, Facts, Link
from cniplugin.records.objects import (LOCAL_TABLE, MAIN_TABLE, RESERVED_TABLES, Neighbour,
                                      Route, Rule, table_name)
from cniplugin.engine.store import AttachmentState, Store
from cniplugin.kernel import netlink as _netlink
from cniplugin.protocol.errors import CNIError


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
    rules: list[Rule] = field(default_factory=list)
    tables: dict[int, list[Route]] = field(default_factory=dict)
    main_routes: list[Route] = field(default_factory=list)
    neighbours: list[Neighbour] = field(default_factory=list)


@dataclass
class NodeView:
    """The node-side entries for one pod."""

    inode: int
    host_peer: str
    host_rule_tables: list[int]
    rules: list[Rule]
    routes: list[Route]
    neighbours: list[Neighbour]
    note: str = ""


@dataclass
class PodView:
    netns: str
    snap: Snapshot
    interfaces: list[InterfaceView]
    other_rules: list[Rule]
    other_tables: dict[int, list[Route]]
    attachments: list[AttachmentState]
    state_dir: str
    problems: list[Problem]
    node: NodeView | None = None
    facts: Facts | None = None       # the planner's view (``plan --facts`` accepts show --json)
    engine_drift: EngineDrift | None = None


@dataclass
class EngineDrift:
    """The resident engine's last pod drift check (``engine.drift``), for this pod's netns."""

    checked_at: float
    checked: int                     # attachments compared on the node in that round
    drifted: list[dict]              # the status file's entries of this pod


def engine_drift(state_dir: str, netns_inode: int) -> EngineDrift | None:
    """What the engine found in this pod at its last check (None: it never checked)."""
    from cniplugin.engine.drift import read_status
    status = read_status(state_dir)
    if status is None or not isinstance(status.get("checked_at"), (int, float)):
        return None
    return EngineDrift(status["checked_at"], int(status.get("checked", 0)),
                       [e for e in status.get("drifted", [])
                        if isinstance(e, dict) and e.get("netns_inode") == netns_inode])


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
    other_tables: dict[int, list[Route]] = {}
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
    state_dir = os.path.dirname(store.root)
    return PodView(netns, snap, ordered, other_rules, other_tables, attachments, state_dir,
                   problems, node, facts, engine_drift(state_dir, snap.inode))


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
                problems.append(Problem("empty-table", f"rule `{text(rule)}` points at {v} "
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
                                        f"from {', '.join(short(s) for s in sources)}) has no "
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
                                    f"or DEL did not finish; a DEL or a retried ADD cleans up)"))
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
            problems.append(Problem("untracked", f"`{text(obj)}` carries route-tune's protocol "
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
    with _netlink.Netlink.entered(node_fd) as nl:
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


