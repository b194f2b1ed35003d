"""What a failed ADD leaves: its journal undone, whatever could not be undone recorded, and the
error saying so.

A rollback that cannot remove an object must not lose track of it: the state record keeps
exactly those objects (phase ``rollback-incomplete``, or added to the previous record of a
retried ADD), so DEL, GC and the resident engine can still remove them, and the ADD's error
names them.
"""

from __future__ import annotations

import dataclasses
import logging

from cniplugin.engine.journal import Step, kept, undo
from cniplugin.engine.store import (PHASE_APPLIED, PHASE_LEFTOVER, PHASE_REMOVING,
                                    AttachmentState, Store)
from cniplugin.kernel import netns as _netns
from cniplugin.protocol.errors import CNIError, InternalError

log = logging.getLogger("cniplugin.engine")


def undo_journal(store: Store, state: AttachmentState, pod_nl, node_nl, node_fd: int,
              journal: list[Step]) -> list[tuple[Step, str]]:
    """Undo the journal: node steps (a failure after the node part) under the node lock, then
    the pod steps. Returns the steps that could not be undone.

    A record already ``applied`` is marked ``removing`` first, as DEL marks it: the resident
    engine repairs the node objects of applied records, and would otherwise put back what this
    undo removes (and nobody would own it once the record is gone)."""
    if state.phase == PHASE_APPLIED:
        state.phase = PHASE_REMOVING
        store.write(state)
    failed = []
    node_steps = [s for s in journal if s.side == "node"]
    if node_steps:
        with _netns.node_lock(node_fd):
            failed += undo_steps(store, state, node_nl, node_steps, node=True)
    pod_steps = [s for s in journal if s.side == "pod"]
    if pod_steps:
        failed += undo_steps(store, state, pod_nl, pod_steps, node=False)
    return failed


def undo_steps(store: Store, state: AttachmentState, nl, steps: list[Step], *,
               node: bool) -> list[tuple[Step, str]]:
    """Undo ``steps`` of one side through ``nl``, keeping the shared objects another attachment
    still lists (``Store.still_listed``: the node's others with ``node``, else the pod's).
    Returns the steps that could not be undone."""
    listed = store.still_listed(state, [s.obj for s in steps], node=node)
    return undo(nl, steps, lambda o: o.key() in listed)


def record(store: Store, state: AttachmentState, prior: AttachmentState | None,
                     failed: list[Step]) -> None:
    """After a rollback: the previous record back (plus what could not be undone), or a record
    of only what is left (``rollback-incomplete``), or no record at all."""
    if prior is not None:
        if failed:
            prior.desired = kept(prior.desired, state.desired, failed)
            for key, original in state.originals.items():
                prior.originals.setdefault(key, original)
        store.write(prior)
    elif failed:
        nothing = dataclasses.replace(state.desired, pod_owned=(), pod_shared=(), node_owned=(),
                                      node_shared=(), displaced=())
        state.desired = kept(nothing, state.desired, failed)
        state.phase = PHASE_LEFTOVER
        store.write(state)
    else:
        store.remove(state.container_id, state.ifname)


def naming_leftovers(err: Exception, failed: list[tuple[Step, str]], path: str,
                      had_prior: bool) -> Exception:
    """``err`` with its message saying what the rollback left behind and who removes it."""
    who = "the next DEL" if had_prior else "the next DEL, GC or the resident engine"
    left = (f"the rollback could not undo {len(failed)} change(s) ("
            + "; ".join(text for _, text in failed)
            + f"); they stay recorded in {path} and {who} removes them")
    if isinstance(err, CNIError):
        err.msg = f"{err.msg}; {left}"
        err.args = (err.msg,)
        return err
    log.error("ADD failed unexpectedly: %r", err, exc_info=err)
    return InternalError(f"internal error: {type(err).__name__}: {err}; {left}",
                         "the traceback is in the route-tune log")
