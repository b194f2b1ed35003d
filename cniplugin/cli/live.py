"""Live-state reading for the CLI's show / explain / verify / orphans / facts.

The engine's readers take only what the planner needs (lookup rules with a source, unicast
routes). An operator needs everything: ``goto``/``unreachable`` rules, ``iif``/``fwmark``
selectors, blackhole and local routes. The adapter's full reads (``kernel.netlink`` ``all_rules``,
``all_routes``, ``configured_neighbours``) return them as the engine's own ``records.objects`` types;
this module gathers them into a ``Snapshot`` and finds netns and state files. Planning and
checking are never redone here: drift comes from ``engine.compare.diff_state``, facts from the engine's
gatherers. ``show`` builds views (``cli.show``), ``orphans`` finds leftovers (``cli.orphans``),
``iptext`` prints objects as ``ip`` does.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from cniplugin.records.facts import Addr, Facts, Link
from cniplugin.records.objects import Neighbour, Route, Rule
from cniplugin.engine.store import AttachmentState, Store
from cniplugin.kernel import netlink as _netlink
from cniplugin.kernel import netns as _netns


def LiveRule(family: int, priority: int, action: str = "lookup", **fields) -> Rule:
    """A live rule with the argument order the CLI's readers used (action before table)."""
    return Rule(family, priority, action=action, **{"table": 0, "proto": 0, **fields})


def LiveRoute(family: int, table: int, type: str, dst: str, **fields) -> Route:
    """A live route with the argument order the CLI's readers used (type before dst)."""
    return Route(family, table, dst, **{"dev": "", "proto": 0, **fields}, type=type)


@dataclass
class Snapshot:
    """Everything routing-related in one netns."""

    inode: int
    links: list[Link]
    addrs: list[Addr]
    rules: list[Rule]
    routes: list[Route]
    neighbours: list[Neighbour]

    def rules_of(self, family: int) -> list[Rule]:
        return [r for r in self.rules if r.family == family]

    def routes_in(self, table: int, family: int | None = None) -> list[Route]:
        return [r for r in self.routes if r.table == table
                and (family is None or r.family == family)]

    def addrs_of(self, ifname: str) -> list[Addr]:
        return [a for a in self.addrs if a.ifname == ifname]

    def local_ips(self) -> set[str]:
        return {a.address for a in self.addrs}


# -- reading -------------------------------------------------------------------------------
def read_rules(nl) -> list[Rule]:
    return [r for fam in (4, 6) for r in nl.all_rules(fam)]


def read_routes(nl, table: int | None = None) -> list[Route]:
    return [r for fam in (4, 6) for r in nl.all_routes(fam, table)]


def read_neighbours(nl, dev: str | None = None) -> list[Neighbour]:
    """Configured neighbours only: PERMANENT ones, or any carrying a protocol tag."""
    return sorted(nl.configured_neighbours(dev),
                  key=lambda n: (n.family, n.dev, ipaddress.ip_address(n.ip)))


def snapshot(fd: int | None) -> Snapshot:
    """Read a whole netns (``fd``; None = the calling thread's netns)."""
    with _netlink.Netlink.entered(fd) as nl:
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
    """``engine.compare.diff_state`` (the engine's CHECK) for one recorded attachment."""
    from cniplugin.engine.compare import diff_state
    if node_fd is not None:
        return diff_state(state, pod_fd, node_fd)
    home = _netns.current_netns()
    try:
        return diff_state(state, pod_fd, home)
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
