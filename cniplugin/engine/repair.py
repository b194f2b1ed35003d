"""The resident engine keeps the node right: it puts back the node objects that something else
removed (systemd-networkd's foreign-rule cleanup, ``ip rule flush``, a firewall reload).

What is repaired: the node objects of every attachment recorded as ``applied`` on this node
(the rule into hostRuleTable, the routes in it, the PERMANENT neighbours), and the underlay's
reply-steering table in its pod (route-tune's own table, which nothing of the tenant's
configures; every other pod-side object is the tenant's and is only reported, never rewritten).
Exactly the recorded objects are put back; a foreign object holding one's key is never
overwritten (the repair fails, is logged and backs off).

When: a ``kernel.watch.Watch`` announces a change that may concern a recorded object; events
are debounced briefly, so a flush of many objects is one pass. A full reconcile runs at start-up,
every ``reconcile_interval`` (with jitter) and after lost events (buffer overrun); it also
finishes what a failed ADD's rollback left behind (``rollback-incomplete`` records).

Never racing ADD, DEL or GC: a pass first compares without locks; when something is missing it
takes the node lock (the pod lock for the nft table), reads the records again and repairs only
attachments still ``applied`` (DEL marks its record ``removing`` under its first lock, before it
removes anything, and so does a failed ADD's rollback). Its own writes announce themselves too: creations of route-tune's objects
are not events here, and an nft verification after a repair writes nothing, so nothing loops.
An object removed again and again is repaired with exponential (bounded) back-off, reported
by a warning and a ``repair_backoff`` event; every repair is a ``repair`` event.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time

from cniplugin._version import RTPROT_ROUTE_TUNE
from cniplugin.engine import observe
from cniplugin.engine.commands import clean_up
from cniplugin.engine.compare import compare
from cniplugin.engine.store import (PHASE_APPLIED, PHASE_APPLYING, PHASE_LEFTOVER,
                                    AttachmentState, Store, key_text)
from cniplugin.kernel import netns as _netns
from cniplugin.kernel.netlink import Netlink
from cniplugin.kernel.nft import TABLE as NFT_TABLE
from cniplugin.kernel.watch import Change, Watch, ensure_peer_id
from cniplugin.protocol.errors import CNIError
from cniplugin.records.objects import (KernelObject, Neighbour, NftTable, Route, Rule,
                                       apply_order)
from cniplugin.records.values import value

__all__ = ["Settings", "Repairer", "Backoff"]

log = logging.getLogger("cniplugin.repair")

#: The ``kind`` of ``repair`` / ``repair_backoff`` events.
KINDS = {Rule: "rule", Route: "route", Neighbour: "neighbour", NftTable: "nft_table"}


@value
class Settings:
    """How often and how patiently the engine repairs (``cni-route-tune serve`` options)."""

    reconcile_interval: float = 60.0   # full reconcile period, seconds
    jitter: float = 0.1                # +- this fraction of the period
    debounce: float = 0.02             # quiet time after the last event before a pass
    debounce_max: float = 0.1          # a pass at the latest this long after the first event
    backoff_base: float = 1.0          # the first pause for an object removed again
    backoff_max: float = 300.0         # the longest pause
    repeat_window: float = 30.0        # a removal this soon after its repair is a repeat


class Backoff:
    """Per object: when it may be repaired next. Repairs of one object that follow each other
    within ``repeat_window`` double the pause (``base`` .. ``cap``); a failed repair counts as
    a repeat."""

    def __init__(self, base: float, cap: float, window: float) -> None:
        self.base, self.cap, self.window = base, cap, window
        self._marks: dict[str, tuple[int, float, float]] = {}  # key -> (repeats, last, not_before)

    def allowed(self, key: str, now: float) -> bool:
        mark = self._marks.get(key)
        return mark is None or now >= mark[2]

    def not_before(self, key: str) -> float:
        return self._marks[key][2]

    def record(self, key: str, now: float, failed: bool = False) -> float:
        """Note a repair (or a failed one) of ``key``; returns the pause before the next."""
        repeats, last, _ = self._marks.get(key, (-1, float("-inf"), 0.0))
        repeats = repeats + 1 if (now - last < self.window or failed) else 0
        if failed:
            repeats = max(repeats, 1)
        pause = min(self.base * 2 ** (repeats - 1), self.cap) if repeats else 0.0
        self._marks[key] = (repeats, now, now + pause)
        return pause

    def prune(self, now: float) -> None:
        """Forget objects left alone for a while (memory stays bounded)."""
        horizon = self.window + self.cap
        for key in [k for k, (_, last, _) in self._marks.items() if now - last > horizon]:
            del self._marks[key]


class Repairer:
    """The watcher thread. ``start()`` after the engine's socket is bound, ``stop()`` on
    shutdown; ``reconcile()`` runs one full pass in the calling thread (tests, start-up)."""

    def __init__(self, state_dir: str, settings: Settings | None = None,
                 node_fd: int | None = None) -> None:
        """``node_fd``: the node netns to keep right (None: this process's own)."""
        self.store = Store(state_dir)
        self.settings = settings or Settings()
        s = self.settings
        self.backoff = Backoff(s.backoff_base, s.backoff_max, s.repeat_window)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._node_fd = os.dup(node_fd) if node_fd is not None else -1
        self._node_inode = 0
        self._retry_at: float | None = None
        # What events can concern, refreshed by every pass: host peers, tables, underlay pods.
        self._peers: set[str] = set()
        self._tables: set[int] = set()
        self._underlay = False
        self._heard: set[int] = set()   # underlay pods the watch hears (they have an id here)
        self._stale = True

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> Repairer:
        self._thread = threading.Thread(target=self._run, name="route-tune-repair", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _run(self) -> None:
        if self._node_fd < 0:
            _netns.join_process_netns()  # wherever the starting thread happened to be
            self._node_fd = _netns.current_netns()
        self._node_inode = _netns.inode(self._node_fd)
        try:
            with _netns.entered(self._node_fd):
                watch = Watch()  # its sockets listen in the netns they are created in
        except OSError as err:
            log.error("node repair disabled: cannot watch the node's netlink events: %s", err)
            os.close(self._node_fd)
            return
        try:
            with _netns.entered(self._node_fd):  # nsid requests and links are the node's
                self._loop(watch)
        except Exception:  # a bug here must never take the engine down with it
            log.exception("node repair stopped")
        finally:
            watch.close()
            os.close(self._node_fd)

    def _loop(self, watch: Watch) -> None:
        s = self.settings
        self._guarded(self.reconcile)
        next_full = time.monotonic() + self._period()
        pending: set[str] = set()
        first = last = 0.0
        while not self._stopping.is_set():
            deadline = next_full
            if pending:
                deadline = min(deadline, last + s.debounce, first + s.debounce_max)
            if self._retry_at is not None:
                deadline = min(deadline, self._retry_at)
            changes = watch.wait(deadline - time.monotonic(), self._wake_r)
            if self._stopping.is_set():
                return
            now = time.monotonic()
            if changes is None:
                log.warning("node events were lost (netlink receive buffer overrun): "
                            "full reconcile")
                next_full = now
            else:
                for change in changes:
                    scope = self._scope(change)
                    if scope:
                        first = first if pending else now
                        last = now
                        pending.add(scope)
            retry = self._retry_at is not None and now >= self._retry_at
            if now >= next_full:
                self._guarded(self.reconcile)
                next_full = time.monotonic() + self._period()
                pending.clear()
            elif retry or (pending and now >= min(last + s.debounce, first + s.debounce_max)):
                if retry:
                    self._retry_at = None  # a pass that still finds it deferred sets it again
                if "node" in pending or retry:
                    self._guarded(self.repair_node)
                if "nft" in pending or retry:
                    self._guarded(self.repair_nft)
                pending.clear()

    def _guarded(self, action) -> None:
        """One pass; its failure is logged and the next event or reconcile tries again."""
        try:
            action()
        except (CNIError, OSError) as err:
            log.warning("node repair pass failed: %s", err)
        except Exception:  # a bug in one pass must not end the repair for good
            log.exception("node repair pass failed")

    def _period(self) -> float:
        s = self.settings
        return s.reconcile_interval * (1 + random.uniform(-s.jitter, s.jitter))

    # -- which events matter ------------------------------------------------------------
    def _scope(self, c: Change) -> str:
        """The pass a change calls for: "node", "nft", or "" (none: nothing recorded is
        concerned)."""
        if c.kind == "nft":
            if c.name != NFT_TABLE:
                return ""
            if not self._underlay and self._stale:
                self._refresh(self._node_records())
            return "nft" if self._underlay else ""
        if c.kind in ("rule", "route", "neighbour"):
            if c.proto == RTPROT_ROUTE_TUNE:
                if not c.removed:
                    self._stale = True  # an ADD (or a repair): a new peer or table may follow
                    return ""
                return "node"
            if not c.removed and c.kind != "neighbour" and c.table in self._tables:
                return "node"       # a foreign object written over one of ours
            return ""
        if c.name not in self._peers and self._stale:  # links: a host peer's routes die with it
            self._refresh(self._node_records())
        return "node" if c.name in self._peers else ""

    # -- records ------------------------------------------------------------------------
    def _node_records(self) -> list[AttachmentState]:
        """This node's records, in every phase: one read of the state files, shared by a
        pass (``_in_phase`` picks the ones a step wants)."""
        return [s for s in self.store.all() if s.node_inode == self._node_inode]

    def _refresh(self, records: list[AttachmentState]) -> list[AttachmentState]:
        """Note what events can concern (host peers, tables, underlay pods) from this node's
        ``records``; returns the applied ones."""
        states = _in_phase(records, PHASE_APPLIED)
        self._peers = {s.desired.host_peer for s in states if s.desired.host_peer}
        self._tables = {s.desired.host_rule_table for s in states if s.desired.host_rule_table}
        underlay = {s.netns_inode: s.netns for s in states if s.netns and
                    any(isinstance(o, NftTable) for o in s.desired.pod_owned)}
        self._underlay = bool(underlay)
        # An ADD in flight may bring a new host peer, table or underlay pod: look again later.
        self._stale = any(s.phase == PHASE_APPLYING for s in records)
        for inode, path in underlay.items():
            if inode not in self._heard:
                self._hear(inode, path)
        self._heard &= set(underlay)
        return states

    def _hear(self, inode: int, path: str) -> None:
        """Make sure the watch hears this underlay pod's nftables changes (an id for it here)."""
        with _netns.opened_if_same(path, inode) as pod_fd:
            if pod_fd is not None:  # else the pod is gone: DEL or GC cleans up
                ensure_peer_id(pod_fd)
                self._heard.add(inode)

    # -- passes -------------------------------------------------------------------------
    def reconcile(self) -> None:
        """One full pass: the node objects, the underlay nft tables, and what failed ADDs
        left behind. The state files are read once for the whole pass (the node repair reads
        them again under the node lock)."""
        records = self._node_records()
        for state in _in_phase(records, PHASE_LEFTOVER):  # their records alone change here
            errors = clean_up(self.store, state, self._node_fd, only_phase=PHASE_LEFTOVER)
            what = f"what a failed ADD of {state.container_id}/{state.ifname} left behind"
            if errors:
                log.warning("could not remove %s: %s", what, "; ".join(errors))
            else:
                log.info("removed %s", what)
        self.repair_node(records)
        self.repair_nft(records)
        self.backoff.prune(time.monotonic())

    def repair_node(self, records: list[AttachmentState] | None = None) -> None:
        """Put back the recorded node objects that are missing or changed (``records``: this
        node's, as the pass read them; None: read them now)."""
        states = self._refresh(self._node_records() if records is None else records)
        if not any(s.desired.node_objects() for s in states):
            return
        with Netlink.bound_to(self._node_fd) as nl:
            if not self._node_drift(nl, states):  # the common case: no lock taken
                return
            with _netns.node_lock(self._node_fd):
                # Again, under the lock: DEL may have begun.
                states = self._refresh(self._node_records())
                self._put_back(nl, self._node_drift(nl, states))

    def _node_drift(self, nl: Netlink, states: list[AttachmentState]) -> list[KernelObject]:
        wanted: dict[tuple, KernelObject | None] = {}
        for state in states:
            for obj in state.desired.node_objects():
                seen = wanted.setdefault(obj.key(), obj)
                if seen is not None and seen != obj:
                    wanted[obj.key()] = None  # two records disagree: not ours to choose
        expected = [o for o in wanted.values() if o is not None]
        links = {link.name for link in nl.links()}
        live = [*nl.owned_rules(), *nl.owned_neighbours()]
        for table in sorted(self._tables):
            live += nl.routes(table=table, proto=RTPROT_ROUTE_TUNE)
        # An object on a host peer that is gone goes with its pod: DEL or GC cleans up.
        present = [o for o in expected if getattr(o, "dev", None) in (None, *links)]
        return [d.expected for d in compare(nl, "node", present, live)]

    def _put_back(self, nl: Netlink, objs: list[KernelObject]) -> None:
        for obj in apply_order(objs):
            self._repair_one(f"node|{key_text(obj)}", obj, lambda o=obj: (
                nl.create_route(o) if isinstance(o, Route) else nl.apply(o)), "node")

    def repair_nft(self, records: list[AttachmentState] | None = None) -> None:
        """Put back the reply-steering table of every underlay pod that lost it (``records``
        as for ``repair_node``)."""
        for state in _in_phase(self._node_records() if records is None else records,
                               PHASE_APPLIED):
            table = next((o for o in state.desired.pod_owned if isinstance(o, NftTable)), None)
            if table is None:
                continue
            with _netns.opened_if_same(state.netns, state.netns_inode) as pod_fd:
                if pod_fd is not None:  # else gone or another sandbox: DEL or GC cleans up
                    self._repair_pod_table(state, table, pod_fd)

    def _repair_pod_table(self, state: AttachmentState, table: NftTable, pod_fd: int) -> None:
        with Netlink.bound_to(pod_fd) as nl:
            if nl.read(table) == table:
                return
            with _netns.pod_lock(pod_fd):
                now = self.store.load_applied(state)
                if now is None or table not in now.desired.pod_owned:
                    return
                if nl.read(table) != table:
                    self._repair_one(f"nft|{state.netns_inode}", table,
                                     lambda: nl.apply(table), f"pod {state.netns}")

    def _repair_one(self, key: str, obj: KernelObject, action, where: str) -> None:
        kind = KINDS.get(type(obj), type(obj).__name__.lower())
        now = time.monotonic()
        if not self.backoff.allowed(key, now):
            self._retry_by(self.backoff.not_before(key))
            return
        try:
            action()
        except (CNIError, OSError) as err:
            pause = self.backoff.record(key, now, failed=True)
            log.warning("could not repair %s %s `%s`: %s; next try in %.0f s", where, kind,
                        obj.render(), err, pause)
            self._retry_by(now + pause)
            return
        observe.event("repair", kind=kind)
        log.info("repaired %s %s `%s`", where, kind, obj.render())
        pause = self.backoff.record(key, now)
        if pause:
            observe.event("repair_backoff", kind=kind)
            log.warning("%s %s `%s` keeps being removed by something else (systemd-networkd "
                        "without ManageForeignRoutingPolicyRules=no / ManageForeignRoutes=no, a "
                        "firewall reload?): repairing it again in %.0f s at the earliest",
                        where, kind, obj.render(), pause)

    def _retry_by(self, at: float) -> None:
        """A pass is due at ``at`` at the latest (the earliest of the deferred repairs)."""
        self._retry_at = at if self._retry_at is None else min(self._retry_at, at)


def _in_phase(records: list[AttachmentState], phase: str) -> list[AttachmentState]:
    return [s for s in records if s.phase == phase]


def start(state_dir: str, settings: Settings | None = None) -> Repairer:
    """Start repairing this node's recorded attachments: those under ``state_dir`` (the node
    defaults' ``stateDir``, the one the engine's requests use)."""
    log.info("repairing the node objects recorded in %s (full reconcile every %.0f s)",
             state_dir, (settings or Settings()).reconcile_interval)
    return Repairer(state_dir, settings).start()
