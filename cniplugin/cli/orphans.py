"""``cni-route-tune orphans``: route-tune's node entries no state file lists, and state files
whose pod is gone; ``--remove`` cleans both up through the engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cniplugin.cli.iptext import text
from cniplugin.cli.live import netns_inode, read_neighbours, read_routes, read_rules, state_file
from cniplugin.records.objects import Neighbour, Route, Rule
from cniplugin.engine.store import AttachmentState, Store
from cniplugin.kernel import netlink as _netlink
from cniplugin.kernel import netns as _netns
from cniplugin.protocol.errors import CNIError


@dataclass
class Orphans:
    node_inode: int
    state_dir: str
    tables: list[int]
    objects: list[Rule | Route | Neighbour]   # route-tune's, unreferenced
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
    with _netlink.Netlink.entered(node_fd) as nl:
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
    from cniplugin.protocol.invocation import Invocation

    for state, _why in found.stale_states:
        inv = Invocation(command="DEL", container_id=state.container_id, ifname=state.ifname,
                         netns="", network=state.network, cni_version="",
                         state_dir=found.state_dir, node_netns_fd=node_fd)
        try:
            _engine.cmd_del(inv)
            found.removed.append(f"state {state_file(store, state)} (and its node entries)")
        except CNIError as err:
            found.errors.append(f"{state.container_id}/{state.ifname}: {err.msg}")
    with _netns.node_lock(node_fd):
        # Re-read under the lock: an ADD writes its state before it touches the node.
        again = find_orphans(store, node_fd, set(found.tables))
        with _netlink.Netlink.entered(node_fd) as nl:
            for obj in again.objects:
                # Remove exactly what was read: Route's dev/gateway/scope/src and a rule's
                # priority/table/src/mark are what a delete matches on.
                try:
                    nl.remove(obj)
                    found.removed.append(text(obj))
                except CNIError as err:
                    found.errors.append(f"{text(obj)}: {err.msg}")
