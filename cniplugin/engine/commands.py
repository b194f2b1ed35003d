"""ADD / DEL / CHECK / GC / STATUS: locks, facts, plan, write-ahead state, apply, rollback.

ADD: pod lock -> facts (pod, then node) -> plan -> state written (write-ahead) -> link attrs ->
probes -> displaced routes out -> pod objects in dependency order -> node objects under the node
lock -> state marked applied -> announce. Any failure undoes the journal in reverse and restores
the previous state record (or removes it) before the error propagates; whatever the rollback
could not undo stays recorded (``rollback-incomplete``) and the error names it.
DEL works from the state record alone, so it needs neither prevResult nor a live netns.
A request opens one netlink session per netns (pod, node) and uses it throughout.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from cniplugin.engine import faults as _faults
from cniplugin.engine import observe
from cniplugin.kernel.netlink import Netlink
from cniplugin.kernel import netns as _netns
from cniplugin.protocol.errors import (CheckFailed, GatewayUnreachable, IOFailure, IPConflict,
                                       PluginError, PluginNotAvailable, UnknownContainer)
from cniplugin.records.facts import Facts
from cniplugin.engine import rollback as _rollback
from cniplugin.engine.compare import Drift, diff_state
from cniplugin.engine.journal import Applier, Step
from cniplugin.records.objects import Desired, KernelObject, LinkAttr, Route, Sysctl, Veth, apply_order
from cniplugin.engine.gather import (Gathered, gather_invocation, owned_node_objects,
                                     owned_pod_objects, sessions_bound_to)
from cniplugin.protocol.invocation import Invocation
from cniplugin.engine.planner import plan
from cniplugin.engine.store import (PHASE_APPLIED, PHASE_LEFTOVER, PHASE_REMOVING,
                                    AttachmentState, Store, key_text)

_fault = _faults.point  # test-only fault points (see _faults and docs/routing.md)


# -- invocation helpers ------------------------------------------------------------------
@contextlib.contextmanager
def _node_fd(inv: Invocation) -> Iterator[int]:
    """The node netns as an fd we can return to from inside the pod."""
    if inv.node_netns_fd is not None:
        yield inv.node_netns_fd
        return
    fd = _netns.current_netns()
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _pod_fd(inv: Invocation, required: bool) -> Iterator[int | None]:
    """The pod netns fd (None when gone and not ``required``)."""
    if inv.pod_netns_fd is not None:
        yield inv.pod_netns_fd
        return
    why = "is empty"
    try:
        fd = _netns.open_netns(inv.netns) if inv.netns else None
    except OSError as err:  # ENOENT, ENOTDIR, ELOOP, ENAMETOOLONG, EACCES: no usable netns
        fd, why = None, f"cannot be opened ({err.strerror or err})"
    if fd is None and required:
        raise UnknownContainer(f"pod netns {inv.netns!r} {why}")
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


# -- facts and plan ----------------------------------------------------------------------
def _plan(inv: Invocation, gathered: Gathered, prior: Desired | None) -> Desired:
    return plan(inv.config, gathered.attachment, gathered.facts, prior, mode=gathered.mode)


def plan_for(inv: Invocation, gathered: Gathered) -> Desired:
    """The plan ADD would install for ``inv`` from ``gathered`` (no root needed: the state
    store is read only for a retried ADD's prior plan)."""
    prior = Store(inv.state_dir).load(inv.container_id, inv.ifname)
    return _plan(inv, gathered, prior.desired if prior else None)


# -- ADD ---------------------------------------------------------------------------------
def cmd_add(inv: Invocation):
    """Install the attachment's routing; returns prevResult (MAC updated with podMACPrefix)."""
    _faults.begin()
    store = Store(inv.state_dir)
    with _pod_fd(inv, required=True) as pod_fd, _node_fd(inv) as node_fd, \
            _netns.pod_lock(pod_fd), sessions_bound_to(pod_fd, node_fd) as (pod_nl, node_nl):
        pod_inode = _netns.inode(pod_fd)
        prior = store.load(inv.container_id, inv.ifname)
        if prior is not None and prior.phase == PHASE_LEFTOVER:
            _finish_first(store, prior, pod_fd, node_fd)
            prior = None
        if prior is not None and prior.netns_inode != pod_inode:
            prior = None  # a record of another sandbox with this id: never reuse its plan
        with observe.timed("ADD", "gather"):
            gathered = gather_invocation(inv, pod_nl, node_nl, node_fd)
        facts = gathered.facts
        with observe.timed("ADD", "plan"):
            desired = _plan(inv, gathered, prior.desired if prior else None)
        state = AttachmentState(
            container_id=inv.container_id, ifname=inv.ifname, network=inv.network,
            netns=inv.netns, netns_inode=pod_inode, node_inode=_netns.inode(node_fd),
            desired=desired, pod_namespace=inv.pod_namespace, pod_name=inv.pod_name)
        state.originals = _originals(pod_nl, desired, prior, store.pod_siblings(state))
        _fault("state")
        store.write(state)  # write-ahead: from here on DEL/GC can clean up
        journal: list[Step] = []
        failed: list[tuple[Step, str]] = []
        try:
            _fault("state:written")
            with observe.timed("ADD", "apply"):  # includes the probe phase (before the routes)
                _apply_pod(inv, pod_nl, pod_fd, desired, facts, journal)
                _apply_node(store, state, node_nl, node_fd, journal, failed)
            _fault("state:before-applied")
            state.phase = PHASE_APPLIED
            store.write(state)
            _fault("state:applied")
        except BaseException as err:
            failed += _rollback.undo_journal(store, state, pod_nl, node_nl, node_fd, journal)
            _rollback.record(store, state, prior, [step for step, _ in failed])
            if failed and isinstance(err, Exception):
                raise _rollback.naming_leftovers(
                    err, failed, store.path(inv.container_id, inv.ifname), prior is not None) \
                    from err
            raise
        with observe.timed("ADD", "announce"):
            _announce(inv.config, pod_fd, inv.ifname, facts)
    return _result_with_mac(inv.prev_result, inv.ifname, desired)


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


def _apply_pod(inv: Invocation, nl, pod_fd: int, desired: Desired, facts: Facts,
               journal: list[Step]) -> None:
    shared = {o.key() for o in desired.pod_shared}
    live = [*facts.pod.owned_rules, *facts.pod.owned_routes, *facts.pod.owned_neighbours]
    applier = Applier(nl, "pod", live, journal)
    ordered = apply_order(desired.pod_objects())
    for obj in ordered:
        if isinstance(obj, LinkAttr):  # the MAC must be final before anyone is probed
            applier.apply(obj, shared=False)
    with observe.timed("ADD", "probe"):
        _probe_addresses(inv.config, inv.ifname, pod_fd, desired, facts)
    for route in desired.displaced:
        if route in facts.pod.main_routes:
            applier.displace(route)
    for obj in ordered:
        if not isinstance(obj, LinkAttr):
            applier.apply(obj, shared=obj.key() in shared)


def _apply_node(store: Store, state: AttachmentState, nl, node_fd: int,
                journal: list[Step], failed: list[tuple[Step, str]]) -> None:
    desired = state.desired
    if not desired.node_objects():
        return
    shared = {o.key() for o in desired.node_shared}
    with _netns.node_lock(node_fd):
        live = owned_node_objects(nl, desired.host_rule_table, desired.host_peer)
        applier = Applier(nl, "node", live, journal)
        start = len(journal)
        try:
            for obj in apply_order(desired.node_objects()):
                applier.apply(obj, shared=obj.key() in shared)
        except BaseException:
            # Undo the node part while still holding the node lock, then let _rollback do the pod.
            failed += _rollback.undo_steps(store, state, nl, journal[start:], node=True)
            del journal[start:]
            raise


def _finish_first(store: Store, prior: AttachmentState, pod_fd: int, node_fd: int) -> None:
    """A retried ADD (pod lock held) first removes what a failed earlier one left behind."""
    errors = _teardown(store, prior, pod_fd, node_fd, pod_locked=True,
                       only_phase=PHASE_LEFTOVER)
    if errors:
        raise PluginError(f"a failed earlier ADD of {prior.ifname} left objects that cannot be "
                          f"removed now; retry ADD, or DEL", "; ".join(errors))


def _probe_addresses(config, ifname: str, pod_fd: int, desired: Desired, facts: Facts) -> None:
    """Conflict first, then gateway, from inside the pod, before routes change: a gateway
    probe sent from an address someone else holds would poison the gateway's ARP cache."""
    if not (config.detect_ip_conflict or config.detect_gateway):
        return
    from cniplugin.kernel import probe as _probe
    _fault("probe")
    options = config.detect_options
    opts = _probe.ProbeOptions(retries=options.retries, interval=options.interval,
                               timeout=options.timeout)
    addresses = [a.cidr for a in facts.pod.addrs_of(ifname)]
    try:
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
    except IPConflict:
        observe.event("probe", outcome="ip_conflict")
        raise
    except GatewayUnreachable:
        observe.event("probe", outcome="gateway_unreachable")
        raise
    observe.event("probe", outcome="ok")


def _announce(config, pod_fd: int, ifname: str, facts: Facts) -> None:
    """After every successful ADD: a GARP per IPv4 and an unsolicited NA per IPv6 address, so a
    peer holding a stale entry for a reused address learns the new MAC. An NA waits
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
def cmd_del(inv: Invocation) -> None:
    """Remove exactly this attachment's objects (and shared ones nobody else lists)."""
    store = Store(inv.state_dir)
    state = store.load(inv.container_id, inv.ifname)
    if state is None:
        return  # write-ahead: no record means ADD changed nothing
    _faults.begin()
    with _pod_fd(inv, required=False) as pod_fd, _node_fd(inv) as node_fd, \
            observe.timed("DEL", "apply"):
        errors = _teardown(store, state, pod_fd, node_fd)
    if errors:
        raise PluginError(f"DEL of {inv.ifname} could not remove everything; retry DEL",
                          "; ".join(errors))


def _teardown(store: Store, state: AttachmentState, pod_fd: int | None, node_fd: int, *,
              pod_locked: bool = False, only_phase: str | None = None) -> list[str]:
    """Pod side (under the pod lock), then node side (also under the node lock); every step is
    attempted, failures are returned. Under the first lock the record is read again and marked
    ``removing`` before anything is removed, so the resident engine never puts back what a DEL
    has begun to remove (``only_phase``: act only if the record is still in that phase). When
    nothing failed the record is removed while both locks are still held, so a sibling DEL
    never counts a record whose objects are gone. A veth pair goes with its pod end; when the
    pod cannot be reached its node end is deleted from the node (only if its alias names this
    pod)."""
    errors: list[str] = []
    if pod_fd is not None and _netns.inode(pod_fd) != state.netns_inode:
        pod_fd = None  # the path now names another sandbox: leave it alone
    node_here = _netns.inode(node_fd) == state.node_inode
    with contextlib.ExitStack() as locks:
        node_locked = False
        if pod_fd is not None:
            if not pod_locked:
                locks.enter_context(_netns.pod_lock(pod_fd))
        elif node_here:
            locks.enter_context(_netns.node_lock(node_fd))
            node_locked = True
        state = _claim(store, state, only_phase)
        if state is None:
            return errors
        desired = state.desired
        veth = next((o for o in desired.pod_owned if isinstance(o, Veth)), None)
        if pod_fd is not None:
            with Netlink.bound_to(pod_fd) as nl:
                listed = store.still_listed(state, desired.pod_shared, node=False)
                errors += _remove_side(nl, "pod", desired.pod_owned, desired.pod_shared,
                                       listed, state.originals)
                for route in desired.displaced:
                    errors += _attempt(nl.restore, route)
                    _fault(f"del:pod:restore {route.render()}")
        if (desired.node_objects() or veth) and node_here:
            if not node_locked:
                locks.enter_context(_netns.node_lock(node_fd))
            with Netlink.bound_to(node_fd) as nl:
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


def _claim(store: Store, state: AttachmentState,
           only_phase: str | None) -> AttachmentState | None:
    """The record as it is now (a lock is held), marked ``removing``; None: nothing to do."""
    current = store.load(state.container_id, state.ifname)
    if current is None or (only_phase is not None and current.phase != only_phase):
        return None
    if current.phase != PHASE_REMOVING:
        current.phase = PHASE_REMOVING
        store.write(current)
    return current


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
def diff(inv: Invocation) -> list[Drift]:
    """Recorded intent vs the kernel, for this attachment (empty list: no drift)."""
    state = Store(inv.state_dir).load(inv.container_id, inv.ifname)
    if state is None:
        raise CheckFailed(f"no route-tune state for {inv.container_id}/{inv.ifname}: "
                          f"was ADD run for this attachment?")
    with _pod_fd(inv, required=True) as pod_fd, _node_fd(inv) as node_fd:
        if _netns.inode(pod_fd) != state.netns_inode:
            raise CheckFailed(f"netns {inv.netns} is not the sandbox ADD configured")
        with observe.timed("CHECK", "gather"):
            return diff_state(state, pod_fd, node_fd)


def cmd_check(inv: Invocation) -> None:
    if inv.prev_result is not None:
        for interface in inv.prev_result.interfaces:
            if interface.name == inv.ifname and interface.sandbox and \
                    interface.sandbox != inv.netns:
                raise CheckFailed(f"{inv.ifname} belongs to sandbox {interface.sandbox}, "
                                  f"not CNI_NETNS {inv.netns}")
    drifts = diff(inv)
    if drifts:
        # libcni prints "msg; details": details lists only the drifts msg does not name.
        raise CheckFailed(f"{len(drifts)} route-tune object(s) of {inv.ifname} drifted: "
                          + drifts[0].describe(), "; ".join(d.describe() for d in drifts[1:]))


# -- GC / STATUS / read-only -------------------------------------------------------------
def _valid_attachments(raw) -> set[tuple[str, str]]:
    entries = raw.get("cni.dev/valid-attachments")
    if entries is None:
        entries = raw.get("cni.dev/attachments") or []
    return {(str(e.get("containerID", "")), str(e.get("ifname", ""))) for e in entries
            if isinstance(e, dict)}


def cmd_gc(inv: Invocation) -> None:
    """Tear down every attachment of this network that the runtime no longer knows."""
    store = Store(inv.state_dir)
    valid, network = _valid_attachments(inv.raw), inv.network
    errors: list[str] = []
    with _node_fd(inv) as node_fd:
        for state in list(store.all()):
            leftover = state.phase == PHASE_LEFTOVER  # never a live attachment, listed or not
            if state.network != network or \
                    ((state.container_id, state.ifname) in valid and not leftover):
                continue
            failed = clean_up(store, state, node_fd,
                              only_phase=PHASE_LEFTOVER if leftover else None)
            errors += [f"{state.container_id}/{state.ifname}: {e}" for e in failed]
    if errors:
        raise PluginError(f"GC left {len(errors)} object(s) behind", "; ".join(errors))


def clean_up(store: Store, state: AttachmentState, node_fd: int, *,
             only_phase: str | None = None) -> list[str]:
    """Tear down one recorded attachment from its record alone, as GC does (its pod reached
    through the recorded netns path, if it is still that sandbox); removes the record when
    everything is gone and returns what could not be removed."""
    with _netns.opened_if_same(state.netns, state.netns_inode) as pod_fd:
        return _teardown(store, state, pod_fd, node_fd, only_phase=only_phase)


def cmd_status(inv: Invocation) -> None:
    try:
        Store(inv.state_dir).ensure_usable()
    except IOFailure as err:
        raise PluginNotAvailable(err.msg) from None


def owned_objects(netns_fd: int | None) -> list[KernelObject]:
    """Every rule/route/neighbour route-tune owns in a netns (protocol 231)."""
    with Netlink.entered(netns_fd) as nl:
        return owned_pod_objects(nl)


_COMMANDS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "GC": cmd_gc,
             "STATUS": cmd_status}


def execute(inv: Invocation):
    """Run ``inv.command``: ADD returns the result to print, the other commands None. This is
    the ``engine`` a transport hands to ``protocol.dispatch.run``."""
    return _COMMANDS[inv.command](inv)
