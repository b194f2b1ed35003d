"""ADD / DEL / CHECK / GC / STATUS: locks, facts, plan, write-ahead state, apply, rollback.

ADD: pod lock -> facts (pod, then node) -> plan -> state written (write-ahead) -> link attrs ->
probes -> displaced routes out -> pod objects in dependency order -> node objects under the node
lock -> state marked applied -> announce. Any failure undoes the journal in reverse and restores
the previous state record (or removes it) before the error propagates.
DEL works from the state record alone, so it needs neither prevResult nor a live netns.
A request opens one netlink session per netns (pod, node) and uses it throughout.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

from cniplugin.engine import faults as _faults
from cniplugin.kernel import netlink as _netlink
from cniplugin.kernel import netns as _netns
from cniplugin.protocol.errors import (CheckFailed, InterfaceNotFound, IOFailure, NotChained, PluginError,
                      PluginNotAvailable, RouteConflict, UnknownContainer)
from cniplugin.engine.facts import Facts
from cniplugin.engine.journal import READ_KINDS, Applier, Step, undo
from cniplugin.engine.objects import Desired, KernelObject, LinkAttr, Route, Sysctl, Veth, apply_order
from cniplugin.engine.planner import UNDERLAY_VETH, Attachment, attachment_from_result, plan, resolve_mode
from cniplugin.engine.store import PHASE_APPLIED, AttachmentState, Store, key_text

DEFAULT_STATE_DIR = "/run/route-tune"
_fault = _faults.point  # test-only fault points (see _faults and docs/routing.md)


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
    why = "is empty"
    try:
        fd = _netns.open_netns(req.env.netns) if req.env.netns else None
    except OSError as err:  # ENOENT, ENOTDIR, ELOOP, ENAMETOOLONG, EACCES: no usable netns
        fd, why = None, f"cannot be opened ({err.strerror or err})"
    if fd is None and required:
        raise UnknownContainer(f"pod netns {req.env.netns!r} {why}")
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


# -- sessions, facts and plan ------------------------------------------------------------
@contextlib.contextmanager
def _sessions(pod_fd: int, node_fd: int) -> Iterator[tuple[_netlink.Netlink, _netlink.Netlink]]:
    """One netlink session per netns for the whole request; the pod's knows the node's (the
    underlay veth pair has an end on each side)."""
    with _netlink.open_session(node_fd) as node_nl, _netlink.open_session(pod_fd) as pod_nl:
        pod_nl.node = node_nl
        yield pod_nl, node_nl


def _attachment(req, pod) -> Attachment:
    return attachment_from_result(req.prev_result, req.env.ifname, req.env.container_id,
                                  _network(req), pod)


def _gather(req, pod_nl, node_nl, node_fd: int) -> Facts:
    config, ifname = req.config, req.env.ifname
    eth0 = config.pod_default_cni_nic
    pod = _netlink.gather_pod(pod_nl)
    mode = resolve_mode(config, ifname, [link.name for link in pod.links])
    eth0_link = pod.link(eth0)
    if eth0_link is None:
        raise InterfaceNotFound(f"podDefaultCniNic: interface {eth0!r} is not in the pod netns")
    nsid = pod_nl.node_ns_id(node_fd)
    eth0_addrs = [a.address for a in pod.addrs_of(eth0)]
    if mode == "underlay":
        veth = pod.link(UNDERLAY_VETH)
        node = _netlink.gather_node(node_nl, veth, eth0_addrs, nsid, peer_required=False)
        if veth is not None and node.host_peer is None:
            raise RouteConflict(
                f"{UNDERLAY_VETH} exists in the pod but is not a veth whose peer is on this "
                f"node; underlay mode needs that name for its veth pair")
    else:
        node = _netlink.gather_node(node_nl, eth0_link, eth0_addrs, nsid)
    if req.prev_result is not None and node.host_peer is not None:
        node = replace(node, claims=_netlink.node_claims(node_nl, _attachment(req, pod).addresses,
                                                          node.host_peer.name))
    return Facts(pod=pod, node=node)


def _plan(req, facts: Facts, prior: Desired | None) -> Desired:
    config = req.config
    if req.prev_result is None:
        raise NotChained("route-tune must be chained: it needs a prevResult")
    attachment = _attachment(req, facts.pod)
    if config.pod_mac_prefix and attachment.addresses:
        from cniplugin.kernel import probe as _probe
        mac = _probe.mac_from_prefix(config.pod_mac_prefix, attachment.addresses[0])
        attachment = replace(attachment, mac=mac)
    return plan(config, attachment, facts, prior)


def plan_for(req, facts: Facts | None = None) -> Desired:
    """The plan ADD would install, changing nothing (no root needed when ``facts`` is given)."""
    store = Store(req.config.state_dir)
    prior = store.load(req.env.container_id, req.env.ifname)
    if facts is None:
        with _pod_fd(req, required=True) as pod_fd, _node_fd(req) as node_fd, \
                _sessions(pod_fd, node_fd) as (pod_nl, node_nl):
            facts = _gather(req, pod_nl, node_nl, node_fd)
    return _plan(req, facts, prior.desired if prior else None)


# -- ADD ---------------------------------------------------------------------------------
def cmd_add(req):
    """Install the attachment's routing; returns prevResult (MAC updated with podMACPrefix)."""
    if req.prev_result is None:
        raise NotChained("route-tune must be chained: it needs a prevResult")
    config, env = req.config, req.env
    if str(config.mode) in ("disabled", "disable"):
        return req.prev_result
    _faults.begin()
    store = Store(config.state_dir)
    with _pod_fd(req, required=True) as pod_fd, _node_fd(req) as node_fd, \
            _netns.pod_lock(pod_fd), _sessions(pod_fd, node_fd) as (pod_nl, node_nl):
        prior = store.load(env.container_id, env.ifname)
        if prior is not None and prior.netns_inode != _netns.inode(pod_fd):
            prior = None  # a record of another sandbox with this id: never reuse its plan
        facts = _gather(req, pod_nl, node_nl, node_fd)
        desired = _plan(req, facts, prior.desired if prior else None)
        state = AttachmentState(
            container_id=env.container_id, ifname=env.ifname, network=_network(req),
            netns=env.netns, netns_inode=_netns.inode(pod_fd), node_inode=_netns.inode(node_fd),
            desired=desired)
        state.originals = _originals(pod_nl, desired, prior, store.pod_siblings(state))
        _fault("state")
        store.write(state)  # write-ahead: from here on DEL/GC can clean up
        journal: list[Step] = []
        try:
            _fault("state:written")
            _apply_pod(req, pod_nl, pod_fd, desired, facts, journal)
            _apply_node(store, state, node_nl, node_fd, journal)
            _fault("state:before-applied")
            state.phase = PHASE_APPLIED
            store.write(state)
            _fault("state:applied")
        except BaseException:
            _rollback(store, state, pod_nl, node_nl, node_fd, journal)
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


def _apply_pod(req, nl, pod_fd: int, desired: Desired, facts: Facts,
               journal: list[Step]) -> None:
    shared = {o.key() for o in desired.pod_shared}
    live = [*facts.pod.owned_rules, *facts.pod.owned_routes, *facts.pod.owned_neighbours]
    applier = Applier(nl, "pod", live, journal)
    ordered = apply_order(desired.pod_objects())
    for obj in ordered:
        if isinstance(obj, LinkAttr):  # the MAC must be final before anyone is probed
            applier.apply(obj, shared=False)
    _probe_addresses(req.config, req.env.ifname, pod_fd, desired, facts)
    for route in desired.displaced:
        if route in facts.pod.main_routes:
            applier.displace(route)
    for obj in ordered:
        if not isinstance(obj, LinkAttr):
            applier.apply(obj, shared=obj.key() in shared)


def _apply_node(store: Store, state: AttachmentState, nl, node_fd: int,
                journal: list[Step]) -> None:
    desired = state.desired
    if not desired.node_objects():
        return
    shared = {o.key() for o in desired.node_shared}
    table = next((o.table for o in desired.node_shared), None)
    with _netns.node_lock(node_fd):
        live = _netlink.owned_node_objects(nl, table, desired.host_peer)
        applier = Applier(nl, "node", live, journal)
        start = len(journal)
        try:
            for obj in apply_order(desired.node_objects()):
                applier.apply(obj, shared=obj.key() in shared)
        except BaseException:
            # Undo the node part while still holding the node lock, then let _rollback do the pod.
            listed = store.still_listed(state, [s.obj for s in journal[start:]], node=True)
            undo(nl, journal[start:], lambda o: o.key() in listed)
            del journal[start:]
            raise


def _rollback(store: Store, state: AttachmentState, pod_nl, node_nl, node_fd: int,
              journal: list[Step]) -> None:
    """Undo the journal: node steps (a failure after the node part) under the node lock, then
    the pod steps."""
    node_steps = [s for s in journal if s.side == "node"]
    if node_steps:
        with _netns.node_lock(node_fd):
            listed = store.still_listed(state, [s.obj for s in node_steps], node=True)
            undo(node_nl, node_steps, lambda o: o.key() in listed)
    pod_steps = [s for s in journal if s.side == "pod"]
    if pod_steps:
        listed = store.still_listed(state, [s.obj for s in pod_steps], node=False)
        undo(pod_nl, pod_steps, lambda o: o.key() in listed)


def _probe_addresses(config, ifname: str, pod_fd: int, desired: Desired, facts: Facts) -> None:
    """Conflict first, then gateway (#4475), from inside the pod, before routes change."""
    if not (config.detect_ip_conflict or config.detect_gateway):
        return
    from cniplugin.kernel import probe as _probe
    _fault("probe")
    options = config.detect_options
    opts = _probe.ProbeOptions(retries=options.retries, interval=options.interval,
                               timeout=options.timeout)
    addresses = [a.cidr for a in facts.pod.addrs_of(ifname)]
    with _netns.entered(pod_fd):
        if config.detect_ip_conflict:
            _probe.check_conflicts(ifname, addresses, opts)
        if config.detect_gateway:
            pairs = []
            for route in desired.pod_owned:
                if isinstance(route, Route) and route.is_default and route.dev == ifname:
                    src = next((a.address for a in facts.pod.addrs_of(ifname, route.family)),
                               None)
                    if src and (src, route.gateway) not in pairs:
                        pairs.append((src, route.gateway))
            _probe.check_gateways(ifname, pairs, opts)


def _announce(config, pod_fd: int, ifname: str, facts: Facts) -> None:
    """After every successful ADD: a GARP per IPv4 and an unsolicited NA per IPv6 address, so a
    peer holding a stale entry for a reused address learns the new MAC (#4650). An NA waits
    (bounded) for the address to leave DAD, else is skipped with a log line (probe.announce)."""
    addresses = [a.address for a in facts.pod.addrs_of(ifname)]
    if not addresses:
        return
    from cniplugin.kernel import probe as _probe
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
    _faults.begin()
    with _pod_fd(req, required=False) as pod_fd, _node_fd(req) as node_fd:
        errors = _teardown(store, state, pod_fd, node_fd)
    if errors:
        raise PluginError(f"DEL of {env.ifname} could not remove everything; retry DEL",
                          "; ".join(errors))


def _teardown(store: Store, state: AttachmentState, pod_fd: int | None,
              node_fd: int) -> list[str]:
    """Pod side (under the pod lock), then node side (also under the node lock); every step is
    attempted, failures are returned. When nothing failed the state record is removed while
    both locks are still held, so a sibling DEL never counts a record whose objects are gone.
    A veth pair goes with its pod end; when the pod cannot be reached its node end is deleted
    from the node (only if its alias names this pod)."""
    errors: list[str] = []
    if pod_fd is not None and _netns.inode(pod_fd) != state.netns_inode:
        pod_fd = None  # the path now names another sandbox: leave it alone
    desired = state.desired
    veth = next((o for o in desired.pod_owned if isinstance(o, Veth)), None)
    with contextlib.ExitStack() as locks:
        if pod_fd is not None:
            locks.enter_context(_netns.pod_lock(pod_fd))
            with _netlink.open_session(pod_fd) as nl:
                listed = store.still_listed(state, desired.pod_shared, node=False)
                errors += _remove_side(nl, "pod", desired.pod_owned, desired.pod_shared,
                                       listed, state.originals)
                for route in desired.displaced:
                    errors += _attempt(nl.restore, route)
                    _fault(f"del:pod:restore {route.render()}")
        if (desired.node_objects() or veth) and _netns.inode(node_fd) == state.node_inode:
            locks.enter_context(_netns.node_lock(node_fd))
            with _netlink.open_session(node_fd) as nl:
                if veth is not None and pod_fd is None:
                    errors += _attempt(nl.remove_veth_peer, veth)
                    _fault(f"del:node:veth {veth.peer}")
                listed = store.still_listed(state, desired.node_shared, node=True)
                errors += _remove_side(nl, "node", desired.node_owned, desired.node_shared,
                                       listed, state.originals)
        if not errors:
            _fault("del:state")
            store.remove(state.container_id, state.ifname)
    return errors


def _remove_side(nl, side: str, owned, shared, listed: set[tuple],
                 originals: dict) -> list[str]:
    errors: list[str] = []
    doomed = [*owned, *(o for o in shared if o.key() not in listed)]
    for obj in reversed(apply_order(doomed)):
        if isinstance(obj, (Sysctl, LinkAttr)):
            errors += _attempt(nl.restore, obj, originals.get(key_text(obj)))
        else:
            errors += _attempt(nl.remove, obj)
        _fault(f"del:{side}:{obj.render()}")
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
    with _pod_fd(req, required=True) as pod_fd, _node_fd(req) as node_fd:
        if _netns.inode(pod_fd) != state.netns_inode:
            raise CheckFailed(f"netns {env.netns} is not the sandbox ADD configured")
        return diff_state(state, pod_fd, node_fd)


def diff_state(state: AttachmentState, pod_fd: int, node_fd: int) -> list[Drift]:
    """Recorded intent of one attachment vs the kernel (the CLI's verify uses this too)."""
    desired = state.desired
    drifts: list[Drift] = []
    with _sessions(pod_fd, node_fd) as (pod_nl, node_nl):
        drifts += _compare(pod_nl, "pod", desired.pod_objects(),
                           _netlink.owned_pod_objects(pod_nl))
        if desired.node_objects():
            table = next((o.table for o in desired.node_shared), None)
            live = _netlink.owned_node_objects(node_nl, table, desired.host_peer, by_peer=False)
            drifts += _compare(node_nl, "node", desired.node_objects(), live)
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
        found = nl.read(obj) if isinstance(obj, READ_KINDS) else by_key.get(obj.key())
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
        # libcni prints "msg; details": details lists only the drifts msg does not name.
        raise CheckFailed(f"{len(drifts)} route-tune object(s) of {env.ifname} drifted: "
                          + drifts[0].describe(), "; ".join(d.describe() for d in drifts[1:]))


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
            except OSError:
                pass
            try:
                failed = _teardown(store, state, pod_fd, node_fd)  # removes the record if done
            finally:
                if pod_fd is not None:
                    os.close(pod_fd)
            errors += [f"{state.container_id}/{state.ifname}: {e}" for e in failed]
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
