"""ADD / DEL / CHECK / GC / STATUS: locks, facts, plan, write-ahead state, apply, rollback.

ADD: pod lock -> facts (pod, then node) -> plan -> state written (write-ahead) -> link attrs ->
probes -> displaced routes out -> pod objects in dependency order -> node objects under the node
lock -> state marked applied -> announce. Any failure undoes the journal in reverse and restores
the previous state record (or removes it) before the error propagates.
DEL works from the state record alone, so it needs neither prevResult nor a live netns.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from . import _netlink, _netns
from ._errors import (CheckFailed, InterfaceNotFound, IOFailure, NotChained, PluginError,
                      PluginNotAvailable, UnknownContainer)
from ._facts import Facts
from ._objects import Desired, KernelObject, LinkAttr, Route, Sysctl, apply_order
from ._planner import attachment_from_result, plan, resolve_mode
from ._store import PHASE_APPLIED, AttachmentState, Store, key_text

DEFAULT_STATE_DIR = "/run/route-tune"

#: Reliability tests set this to a callable(point: str) that may raise, to fail ADD at a chosen
#: step. Points: "pod:<render>", "node:<render>", "probe", "state".
fault_hook: Callable[[str], None] | None = None


def _fault(point: str) -> None:
    if fault_hook is not None:
        fault_hook(point)


@dataclass(frozen=True)
class Drift:
    """One difference between recorded intent and the kernel."""

    side: str                      # pod | node
    problem: str                   # missing | changed
    expected: KernelObject
    live: KernelObject | str | None = None

    def describe(self) -> str:
        text = f"{self.side}: {self.problem}: {self.expected.render()}"
        if self.problem == "changed":
            text += f" (live: {self.live.render() if hasattr(self.live, 'render') else self.live})"
        return text


# -- request helpers ---------------------------------------------------------------------
def _state_dir(req) -> str:
    defaults = getattr(req, "node_defaults", None)
    if getattr(req, "netns_gone", False) and defaults is not None:
        return defaults.values.get("stateDir", DEFAULT_STATE_DIR)  # no config model needed
    return req.config.state_dir


def _network(req) -> str:
    return str(req.raw.get("name", ""))


@contextlib.contextmanager
def _node_fd(req) -> Iterator[int]:
    """The node netns as an fd we can return to from inside the pod."""
    if req.node_netns_fd is not None:
        yield req.node_netns_fd
        return
    fd = _netns.current_netns()
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _pod_fd(req, required: bool) -> Iterator[int | None]:
    """The pod netns fd (None when gone and not ``required``)."""
    if req.pod_netns_fd is not None:
        yield req.pod_netns_fd
        return
    try:
        fd = _netns.open_netns(req.env.netns) if req.env.netns else None
    except (FileNotFoundError, NotADirectoryError):
        fd = None
    if fd is None and required:
        raise UnknownContainer(f"pod netns {req.env.netns!r} does not exist")
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


# -- facts and plan ----------------------------------------------------------------------
def _gather(req, pod_fd: int, node_fd: int) -> Facts:
    eth0 = req.config.pod_default_cni_nic
    with _netlink.session(pod_fd) as nl:
        pod = _netlink.gather_pod(nl)
        node_nsid = nl.node_ns_id(node_fd)
    eth0_link = pod.link(eth0)
    if eth0_link is None:
        raise InterfaceNotFound(f"podDefaultCniNic: interface {eth0!r} is not in the pod netns")
    with _netlink.session(node_fd) as nl:
        node = _netlink.gather_node(nl, eth0_link, [a.address for a in pod.addrs_of(eth0)],
                                    node_nsid)
    return Facts(pod=pod, node=node)


def _plan(req, facts: Facts, prior: Desired | None) -> Desired:
    config, env = req.config, req.env
    if req.prev_result is None:
        raise NotChained("route-tune must be chained: it needs a prevResult")
    attachment = attachment_from_result(req.prev_result, env.ifname, env.container_id,
                                        _network(req), facts.pod)
    if config.pod_mac_prefix and attachment.addresses:
        from . import _probe

        mac = _probe.mac_from_prefix(config.pod_mac_prefix, attachment.addresses[0])
        attachment = replace(attachment, mac=mac)
    return plan(config, attachment, facts, prior)


def plan_for(req, facts: Facts | None = None) -> Desired:
    """The plan ADD would install, changing nothing (no root needed when ``facts`` is given)."""
    store = Store(req.config.state_dir)
    prior = store.load(req.env.container_id, req.env.ifname)
    if facts is None:
        with _pod_fd(req, required=True) as pod_fd, _node_fd(req) as node_fd:
            facts = _gather(req, pod_fd, node_fd)
    return _plan(req, facts, prior.desired if prior else None)


# -- journal and rollback ----------------------------------------------------------------
@dataclass
class _Step:
    side: str               # pod | node
    action: str             # applied | displaced
    obj: KernelObject
    previous: object = None  # live object/value before we touched it (None: absent)
    shared: bool = False


class _Applier:
    """Applies objects on one side, journaling every real change for rollback."""

    def __init__(self, nl, side: str, live: list[KernelObject], journal: list[_Step]):
        self.nl, self.side, self.journal = nl, side, journal
        self.live = {o.key(): o for o in live}

    def apply(self, obj: KernelObject, shared: bool) -> None:
        if isinstance(obj, (Sysctl, LinkAttr)):
            previous = self.nl.read_attr(obj)
            if previous == obj.value:
                return
        else:
            previous = self.live.get(obj.key())
            if previous == obj:
                return
        _fault(f"{self.side}:{obj.render()}")
        self.nl.apply(obj)
        self.journal.append(_Step(self.side, "applied", obj, previous, shared))

    def displace(self, route: Route) -> None:
        _fault(f"{self.side}:displace {route.render()}")
        self.nl.remove(route)
        self.journal.append(_Step(self.side, "displaced", route))


def _undo(nl, steps: list[_Step], still_listed: Callable[[KernelObject], bool]) -> list[str]:
    """Reverse ``steps``; returns what could not be undone (rollback keeps going)."""
    errors = []
    for step in reversed(steps):
        try:
            if step.action == "displaced":
                nl.restore(step.obj)
            elif isinstance(step.obj, (Sysctl, LinkAttr)):
                nl.restore(step.obj, step.previous)
            elif step.previous is not None:
                nl.apply(step.previous)
            elif not (step.shared and still_listed(step.obj)):
                nl.remove(step.obj)
        except Exception as err:  # rollback must try every step; report the rest
            errors.append(f"{step.obj.render()}: {err}")
    return errors


# -- ADD ---------------------------------------------------------------------------------
def cmd_add(req):
    """Install the attachment's routing; returns prevResult (MAC updated with podMACPrefix)."""
    if req.prev_result is None:
        raise NotChained("route-tune must be chained: it needs a prevResult")
    config, env = req.config, req.env
    if resolve_mode(config, env.ifname) == "disabled":
        return req.prev_result
    store = Store(config.state_dir)
    with _pod_fd(req, required=True) as pod_fd, _node_fd(req) as node_fd, \
            _netns.pod_lock(pod_fd):
        prior = store.load(env.container_id, env.ifname)
        if prior is not None and prior.netns_inode != _netns.inode(pod_fd):
            prior = None  # a record of another sandbox with this id: never reuse its plan
        facts = _gather(req, pod_fd, node_fd)
        desired = _plan(req, facts, prior.desired if prior else None)
        state = AttachmentState(
            container_id=env.container_id, ifname=env.ifname, network=_network(req),
            netns=env.netns, netns_inode=_netns.inode(pod_fd), node_inode=_netns.inode(node_fd),
            desired=desired)
        with _netlink.session(pod_fd) as nl:
            state.originals = _originals(nl, desired, prior, store.pod_siblings(state))
        _fault("state")
        store.write(state)  # write-ahead: from here on DEL/GC can clean up
        journal: list[_Step] = []
        try:
            _apply_pod(req, pod_fd, desired, facts, journal)
            _apply_node(store, state, node_fd, journal)
            state.phase = PHASE_APPLIED
            store.write(state)
        except BaseException:
            _rollback(store, state, pod_fd, node_fd, journal)
            if prior is not None:
                store.write(prior)
            else:
                store.remove(env.container_id, env.ifname)
            raise
        _announce(config, pod_fd, env.ifname, facts)
    return _result_with_mac(req.prev_result, env.ifname, desired)


def _originals(nl, desired: Desired, prior: AttachmentState | None,
               siblings: list[AttachmentState]) -> dict[str, str | None]:
    """Pre-ADD values of the sysctls/link attributes we change (first recorder wins)."""
    out = {}
    for obj in desired.pod_objects():
        if not isinstance(obj, (Sysctl, LinkAttr)):
            continue
        key = key_text(obj)
        known = [s.originals for s in ([prior] if prior else []) + siblings if key in s.originals]
        out[key] = known[0][key] if known else nl.read_attr(obj)
    return out


def _apply_pod(req, pod_fd: int, desired: Desired, facts: Facts, journal: list[_Step]) -> None:
    shared = {o.key() for o in desired.pod_shared}
    live = [*facts.pod.owned_rules, *facts.pod.owned_routes, *facts.pod.owned_neighbours]
    with _netlink.session(pod_fd) as nl:
        applier = _Applier(nl, "pod", live, journal)
        ordered = apply_order(desired.pod_objects())
        for obj in ordered:
            if isinstance(obj, LinkAttr):  # the MAC must be final before anyone is probed
                applier.apply(obj, shared=False)
        _probe_addresses(req.config, req.env.ifname, desired, facts)
        for route in desired.displaced:
            if route in facts.pod.main_routes:
                applier.displace(route)
        for obj in ordered:
            if not isinstance(obj, LinkAttr):
                applier.apply(obj, shared=obj.key() in shared)


def _apply_node(store: Store, state: AttachmentState, node_fd: int,
                journal: list[_Step]) -> None:
    desired = state.desired
    if not desired.node_objects():
        return
    shared = {o.key() for o in desired.node_shared}
    table = next((o.table for o in desired.node_shared), None)
    with _netns.node_lock(node_fd), _netlink.session(node_fd) as nl:
        live = _netlink.owned_node_objects(nl, table, desired.host_peer)
        applier = _Applier(nl, "node", live, journal)
        start = len(journal)
        try:
            for obj in apply_order(desired.node_objects()):
                applier.apply(obj, shared=obj.key() in shared)
        except BaseException:
            # Undo the node part while still holding the node lock, then let _rollback do the pod.
            peers = store.node_peers(state)
            _undo(nl, journal[start:], lambda o: any(p.lists(o) for p in peers))
            del journal[start:]
            raise


def _rollback(store: Store, state: AttachmentState, pod_fd: int, node_fd: int,
              journal: list[_Step]) -> None:
    pod_steps = [s for s in journal if s.side == "pod"]
    if pod_steps:
        siblings = store.pod_siblings(state)
        with _netlink.session(pod_fd) as nl:
            _undo(nl, pod_steps, lambda o: any(s.lists(o) for s in siblings))


def _probe_addresses(config, ifname: str, desired: Desired, facts: Facts) -> None:
    """Conflict first, then gateway (#4475), from inside the pod, before routes change."""
    if not (config.detect_ip_conflict or config.detect_gateway):
        return
    from . import _probe

    _fault("probe")
    options = config.detect_options
    opts = _probe.ProbeOptions(retries=options.retries, interval=options.interval,
                               timeout=options.timeout)
    addresses = [a.cidr for a in facts.pod.addrs_of(ifname)]
    if config.detect_ip_conflict:
        _probe.check_conflicts(ifname, addresses, opts)
    if config.detect_gateway:
        pairs = []
        for route in desired.pod_owned:
            if isinstance(route, Route) and route.is_default and route.dev == ifname:
                src = next((a.address for a in facts.pod.addrs_of(ifname, route.family)), None)
                if src and (src, route.gateway) not in pairs:
                    pairs.append((src, route.gateway))
        _probe.check_gateways(ifname, pairs, opts)


def _announce(config, pod_fd: int, ifname: str, facts: Facts) -> None:
    """GARP for IPv4 always (stale caches after IP reuse, #4650); IPv6 only when probing or
    rewriting the MAC, because an NA must wait for DAD to finish."""
    addresses = [a.address for a in facts.pod.addrs_of(ifname)]
    if not (config.detect_ip_conflict or config.detect_gateway or config.pod_mac_prefix):
        addresses = [a for a in addresses if ":" not in a]
    if not addresses:
        return
    from . import _probe

    with _netns.entered(pod_fd):
        _probe.announce(ifname, addresses)


def _result_with_mac(result, ifname: str, desired: Desired):
    mac = next((o.value for o in desired.pod_owned
                if isinstance(o, LinkAttr) and o.attr == "address"), None)
    if mac is None:
        return result
    result = result.model_copy(deep=True)
    for interface in result.interfaces:
        if interface.name == ifname:
            interface.mac = mac
    return result


# -- DEL ---------------------------------------------------------------------------------
def cmd_del(req) -> None:
    """Remove exactly this attachment's objects (and shared ones nobody else lists)."""
    store = Store(_state_dir(req))
    env = req.env
    state = store.load(env.container_id, env.ifname)
    if state is None:
        return  # write-ahead: no record means ADD changed nothing
    with _pod_fd(req, required=False) as pod_fd, _node_fd(req) as node_fd:
        errors = _teardown(store, state, pod_fd, node_fd)
    if errors:
        raise PluginError(f"DEL of {env.ifname} could not remove everything; retry DEL",
                          "; ".join(errors))
    store.remove(env.container_id, env.ifname)


def _teardown(store: Store, state: AttachmentState, pod_fd: int | None,
              node_fd: int) -> list[str]:
    errors: list[str] = []
    if pod_fd is not None and _netns.inode(pod_fd) != state.netns_inode:
        pod_fd = None  # the path now names another sandbox: leave it alone
    desired = state.desired
    if pod_fd is not None:
        with _netns.pod_lock(pod_fd):
            siblings = store.pod_siblings(state)
            with _netlink.session(pod_fd) as nl:
                errors += _remove_side(nl, desired.pod_owned, desired.pod_shared, siblings,
                                       state.originals)
                for route in desired.displaced:
                    errors += _attempt(nl.restore, route)
    if desired.node_objects() and _netns.inode(node_fd) == state.node_inode:
        with _netns.node_lock(node_fd), _netlink.session(node_fd) as nl:
            errors += _remove_side(nl, desired.node_owned, desired.node_shared,
                                   store.node_peers(state), state.originals)
    return errors


def _remove_side(nl, owned, shared, others: list[AttachmentState],
                 originals: dict) -> list[str]:
    errors: list[str] = []
    doomed = [*owned, *(o for o in shared if not any(s.lists(o) for s in others))]
    for obj in reversed(apply_order(doomed)):
        if isinstance(obj, (Sysctl, LinkAttr)):
            errors += _attempt(nl.restore, obj, originals.get(key_text(obj)))
        else:
            errors += _attempt(nl.remove, obj)
    return errors


def _attempt(action, *args) -> list[str]:
    try:
        action(*args)
    except Exception as err:  # DEL is best effort: finish the rest, report this
        return [f"{args[0].render()}: {err}"]
    return []


# -- CHECK -------------------------------------------------------------------------------
def diff(req) -> list[Drift]:
    """Recorded intent vs the kernel, for this attachment (empty list: no drift)."""
    env = req.env
    state = Store(req.config.state_dir).load(env.container_id, env.ifname)
    if state is None:
        raise CheckFailed(f"no route-tune state for {env.container_id}/{env.ifname}: "
                          f"was ADD run for this attachment?")
    drifts: list[Drift] = []
    with _pod_fd(req, required=True) as pod_fd, _node_fd(req) as node_fd:
        if _netns.inode(pod_fd) != state.netns_inode:
            raise CheckFailed(f"netns {env.netns} is not the sandbox ADD configured")
        with _netlink.session(pod_fd) as nl:
            drifts += _compare(nl, "pod", state.desired.pod_objects(),
                               _netlink.owned_pod_objects(nl))
        desired = state.desired
        if desired.node_objects():
            table = next(o.table for o in desired.node_shared)
            with _netlink.session(node_fd) as nl:
                live = _netlink.owned_node_objects(nl, table, desired.host_peer)
                drifts += _compare(nl, "node", desired.node_objects(), live)
    return drifts


def _compare(nl, side: str, expected: list[KernelObject], live: list[KernelObject]) -> list[Drift]:
    by_key = {o.key(): o for o in live}
    out = []
    for obj in apply_order(expected):
        if isinstance(obj, (Sysctl, LinkAttr)):
            value = nl.read_attr(obj)
            if value != obj.value:
                out.append(Drift(side, "missing" if value is None else "changed", obj, value))
            continue
        found = by_key.get(obj.key())
        if found is None:
            out.append(Drift(side, "missing", obj))
        elif found != obj:
            out.append(Drift(side, "changed", obj, found))
    return out


def cmd_check(req) -> None:
    env = req.env
    if req.prev_result is not None:
        for interface in req.prev_result.interfaces:
            if interface.name == env.ifname and interface.sandbox and \
                    interface.sandbox != env.netns:
                raise CheckFailed(f"{env.ifname} belongs to sandbox {interface.sandbox}, "
                                  f"not CNI_NETNS {env.netns}")
    drifts = diff(req)
    if drifts:
        raise CheckFailed(f"{len(drifts)} route-tune object(s) of {env.ifname} drifted: "
                          + drifts[0].describe(), "; ".join(d.describe() for d in drifts))


# -- GC / STATUS / read-only -------------------------------------------------------------
def _valid_attachments(raw: dict) -> set[tuple[str, str]]:
    entries = raw.get("cni.dev/valid-attachments")
    if entries is None:
        entries = raw.get("cni.dev/attachments") or []
    return {(str(e.get("containerID", "")), str(e.get("ifname", ""))) for e in entries
            if isinstance(e, dict)}


def cmd_gc(req) -> None:
    """Tear down every attachment of this network that the runtime no longer knows."""
    store = Store(req.config.state_dir)
    valid, network = _valid_attachments(req.raw), _network(req)
    errors: list[str] = []
    with _node_fd(req) as node_fd:
        for state in list(store.all()):
            if state.network != network or (state.container_id, state.ifname) in valid:
                continue
            pod_fd = None
            try:
                pod_fd = _netns.open_netns(state.netns) if state.netns else None
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                pass
            try:
                failed = _teardown(store, state, pod_fd, node_fd)
            finally:
                if pod_fd is not None:
                    os.close(pod_fd)
            if failed:
                errors += [f"{state.container_id}/{state.ifname}: {e}" for e in failed]
            else:
                store.remove(state.container_id, state.ifname)
    if errors:
        raise PluginError(f"GC left {len(errors)} object(s) behind", "; ".join(errors))


def cmd_status(req) -> None:
    try:
        Store(_state_dir(req)).ensure_usable()
    except IOFailure as err:
        raise PluginNotAvailable(err.msg) from None


def owned_objects(netns_fd: int | None) -> list[KernelObject]:
    """Every rule/route/neighbour route-tune owns in a netns (protocol 231)."""
    with _netlink.session(netns_fd) as nl:
        return _netlink.owned_pod_objects(nl)
