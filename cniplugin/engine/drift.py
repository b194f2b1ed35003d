"""Pod-side drift: the resident engine's periodic look at every recorded attachment's pod side.

The pod is the tenant's netns, so the engine never rewrites it on its own: it compares each
applied attachment's recorded pod objects with the kernel (CHECK's own comparison,
``engine.compare.diff_state``) and reports what differs: a warning naming the pod (from the
runtime's ``K8S_POD_NAMESPACE``/``K8S_POD_NAME``, recorded at ADD), the ``pod_drift`` event (the
metrics), and ``<stateDir>/pod-drift.json``, which ``cni-route-tune show`` prints.

Bounded: one round every ``interval`` seconds (±10 % jitter, so engines on many nodes do not
look in step), counted from the end of the previous round; an attachment is compared under its
pod lock (an ADD or DEL of that pod is never observed half-done, and waits at most one
comparison), and one whose pod netns is gone or is another sandbox is skipped.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time

from cniplugin.engine import observe
from cniplugin.engine.compare import diff_state
from cniplugin.engine.store import PHASE_APPLIED, AttachmentState, Store, write_atomic
from cniplugin.kernel import netns as _netns
from cniplugin.protocol.errors import CNIError

__all__ = ["STATUS_FILE", "DEFAULT_INTERVAL", "MIN_INTERVAL", "PodDriftChecker", "pod_label",
           "read_status"]

log = logging.getLogger("cniplugin.drift")

#: The last round's findings, in the state dir (read by ``cni-route-tune show``).
STATUS_FILE = "pod-drift.json"
DEFAULT_INTERVAL = 60.0
MIN_INTERVAL = 1.0
JITTER = 0.1


def pod_label(state: AttachmentState) -> str:
    """``namespace/name`` when the runtime named the pod, else its container id."""
    if state.pod_name:
        return f"{state.pod_namespace}/{state.pod_name}" if state.pod_namespace \
            else state.pod_name
    return f"container {state.container_id}"


def read_status(state_dir: str) -> dict | None:
    """The last round's status file (None: no engine has checked pods with this state dir)."""
    try:
        with open(os.path.join(state_dir, STATUS_FILE)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _compare(store: Store, state: AttachmentState, node_fd: int) -> list[str] | None:
    """The pod-side drifts of one attachment (described), or None when it cannot be compared
    now (netns gone or another sandbox, record gone or changed while waiting for the lock)."""
    with _netns.opened_if_same(state.netns, state.netns_inode) as pod_fd:
        if pod_fd is None:
            return None
        try:
            with _netns.pod_lock(pod_fd):
                current = store.load_applied(state)
                if current is None:
                    return None
                drifts = diff_state(current, pod_fd, node_fd, node_side=False)
        except CNIError as err:
            log.debug("pod drift check of %s/%s skipped: %s", state.container_id, state.ifname,
                      err.msg)
            return None
    return [d.describe() for d in drifts]


class PodDriftChecker:
    """The background round; ``start()`` after the engine's socket is bound, ``stop()`` at
    shutdown. ``check_once`` is one round (the thread calls it; so can a test)."""

    def __init__(self, state_dir: str, interval: float = DEFAULT_INTERVAL) -> None:
        if interval < MIN_INTERVAL:
            raise ValueError(f"pod drift interval {interval}s is below {MIN_INTERVAL}s")
        self.state_dir, self.interval = state_dir, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = random.Random()
        #: (container id, ifname) -> (found at, the drifts last reported)
        self._known: dict[tuple[str, str], tuple[float, list[str]]] = {}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="route-tune-drift")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        _netns.join_process_netns()
        node_fd = _netns.current_netns()
        try:
            while not self._stop.wait(self.interval * self._rng.uniform(1 - JITTER, 1 + JITTER)):
                try:
                    self.check_once(node_fd)
                except Exception:  # a bug here must not end the engine's other work
                    log.exception("pod drift check failed")
        finally:
            os.close(node_fd)

    def check_once(self, node_fd: int) -> dict:
        """Compare every applied attachment on this node; report, record and return the status."""
        store = Store(self.state_dir)
        node_inode = _netns.inode(node_fd)
        now = time.time()
        checked, drifted, known = 0, [], {}
        new = 0
        for state in store.all():
            if state.phase != PHASE_APPLIED or state.node_inode != node_inode:
                continue
            drifts = _compare(store, state, node_fd)
            if drifts is None:
                continue
            checked += 1
            key = (state.container_id, state.ifname)
            if not drifts:
                if key in self._known:
                    log.info("pod %s: attachment %s/%s matches its record again",
                             pod_label(state), *key)
                continue
            found_at, reported = self._known.get(key, (now, None))
            new += reported is None
            if drifts != reported:
                log.warning(
                    "pod drift: pod %s (attachment %s/%s, network %s): %d route-tune object(s) "
                    "in the pod differ from the record: %s; route-tune does not rewrite a pod: "
                    "find what changed it, then recreate the pod (or DEL and ADD the "
                    "attachment)", pod_label(state), state.container_id, state.ifname,
                    state.network, len(drifts), "; ".join(drifts))
            known[key] = (found_at, drifts)
            drifted.append({
                "container_id": state.container_id, "ifname": state.ifname,
                "network": state.network, "pod_namespace": state.pod_namespace,
                "pod_name": state.pod_name, "netns": state.netns,
                "netns_inode": state.netns_inode, "found_at": found_at, "drifts": drifts})
        self._known = known
        status = {"checked_at": now, "checked": checked, "drifted": drifted}
        self._write_status(status)
        observe.event("pod_drift", attachments=len(drifted), new=new)
        return status

    def _write_status(self, status: dict) -> None:
        path = os.path.join(self.state_dir, STATUS_FILE)
        try:  # a report, rewritten every round: not worth an fsync
            write_atomic(path, json.dumps(status, sort_keys=True), durable=False)
        except OSError as err:
            log.warning("cannot write %s: %s", path, err)
