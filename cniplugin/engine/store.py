"""Per-attachment state files: the write-ahead intent log and the refcounts of shared objects.

``<stateDir>/attachments/<containerID>/<ifname>.json`` is written atomically (tmp + fsync +
rename, directories 0700) BEFORE the first kernel change of an ADD, so a crash at any point
leaves a record DEL/GC can clean up from. A shared object (table 100, the node rule, ...) is
still needed while any other state file lists it: that is the whole refcount.

Phases: ``applying`` (written ahead of an ADD's changes), ``applied`` (the ADD finished: the
resident engine keeps these objects in place), ``removing`` (a DEL or GC has started: nothing
may put them back), ``rollback-incomplete`` (a failed ADD's rollback could not undo everything:
the record lists only what is left, for DEL, GC or the resident engine to remove).
"""

from __future__ import annotations

import json
import os
from contextlib import suppress
from collections.abc import Iterator
from dataclasses import field

from cniplugin.protocol.errors import IOFailure
from cniplugin.records.objects import Desired, KernelObject
from cniplugin.records.values import value

STATE_VERSION = 1
PHASE_APPLYING = "applying"
PHASE_APPLIED = "applied"
PHASE_REMOVING = "removing"
PHASE_LEFTOVER = "rollback-incomplete"


def key_text(obj: KernelObject) -> str:
    """A stable string form of an object's kernel key (JSON object keys must be strings)."""
    return "|".join(map(str, obj.key()))


@value(frozen=False)
class AttachmentState:
    container_id: str
    ifname: str
    network: str
    netns: str
    netns_inode: int
    node_inode: int
    desired: Desired
    originals: dict[str, str | None] = field(default_factory=dict)  # key_text -> old value
    phase: str = PHASE_APPLYING
    pod_namespace: str = ""  # K8S_POD_NAMESPACE / K8S_POD_NAME when the runtime passed them:
    pod_name: str = ""       # reports (pod drift) name the pod, not only its container id

    def to_dict(self) -> dict:
        return {
            "version": STATE_VERSION, "container_id": self.container_id, "ifname": self.ifname,
            "network": self.network, "netns": self.netns, "netns_inode": self.netns_inode,
            "node_inode": self.node_inode, "phase": self.phase, "originals": self.originals,
            "desired": self.desired.to_dict(), "pod_namespace": self.pod_namespace,
            "pod_name": self.pod_name,
        }

    @classmethod
    def from_dict(cls, data: dict) -> AttachmentState:
        return cls(container_id=data["container_id"], ifname=data["ifname"],
                   network=data.get("network", ""), netns=data.get("netns", ""),
                   netns_inode=data.get("netns_inode", 0), node_inode=data.get("node_inode", 0),
                   desired=Desired.from_dict(data["desired"]),
                   originals=dict(data.get("originals", {})),
                   phase=data.get("phase", PHASE_APPLYING),
                   pod_namespace=data.get("pod_namespace", ""), pod_name=data.get("pod_name", ""))


class Store:
    def __init__(self, state_dir: str) -> None:
        self.root = os.path.join(os.path.abspath(state_dir), "attachments")

    # -- paths --------------------------------------------------------------------------
    def _container_dir(self, container_id: str) -> str:
        return self._contained(container_id)

    def path(self, container_id: str, ifname: str) -> str:
        return os.path.join(self._contained(container_id), _component(ifname) + ".json")

    def _contained(self, container_id: str) -> str:
        path = os.path.normpath(os.path.join(self.root, _component(container_id)))
        if os.path.dirname(path) != self.root:
            raise IOFailure(f"container id {container_id!r} escapes the state directory")
        return path

    # -- io -----------------------------------------------------------------------------
    def ensure_usable(self) -> None:
        """Create the state root (0700) and prove it is writable; IOFailure otherwise."""
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            probe = os.path.join(self.root, f".probe.{os.getpid()}")
            with open(probe, "w"):
                pass
            os.unlink(probe)
        except OSError as err:
            raise IOFailure(f"state directory {self.root} is not usable: {err}") from None

    def load(self, container_id: str, ifname: str) -> AttachmentState | None:
        try:
            with open(self.path(container_id, ifname)) as f:
                return AttachmentState.from_dict(json.load(f))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise IOFailure(f"state of {container_id}/{ifname} is unreadable: {err}") from None

    def load_applied(self, state: AttachmentState) -> AttachmentState | None:
        """``state``'s record read again (the caller holds the pod lock), if it is still
        ``applied`` and of the same sandbox (``netns_inode``); None otherwise."""
        current = self.load(state.container_id, state.ifname)
        if current is None or current.phase != PHASE_APPLIED or \
                current.netns_inode != state.netns_inode:
            return None
        return current

    def write(self, state: AttachmentState) -> None:
        path = self.path(state.container_id, state.ifname)
        try:
            # Compact: the C encoder (an indent falls back to the slower pure-Python one).
            write_atomic(path, json.dumps(state.to_dict(), sort_keys=True,
                                          separators=(",", ":")))
        except OSError as err:
            raise IOFailure(f"cannot write state {path}: {err}") from None

    def remove(self, container_id: str, ifname: str) -> None:
        with suppress(FileNotFoundError):
            os.unlink(self.path(container_id, ifname))
        with suppress(OSError):  # not empty (other interfaces) or already gone
            os.rmdir(self._container_dir(container_id))

    def all(self) -> Iterator[AttachmentState]:
        """Every readable state on this node (unreadable files are skipped, not fatal)."""
        try:
            containers = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return
        for container in containers:
            directory = os.path.join(self.root, container)
            try:
                names = sorted(os.listdir(directory))
            except OSError:
                continue
            for name in names:
                if not name.endswith(".json"):
                    continue
                try:
                    state = self.load(container, name[: -len(".json")])
                except IOFailure:
                    continue
                if state is not None:
                    yield state

    # -- refcounts ----------------------------------------------------------------------
    def pod_siblings(self, state: AttachmentState) -> list[AttachmentState]:
        """Other attachments of the same pod (same container and same netns)."""
        directory = self._container_dir(state.container_id)
        out = []
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            return out
        for name in names:
            if name.endswith(".json") and name != f"{state.ifname}.json":
                with suppress(IOFailure):
                    other = self.load(state.container_id, name[: -len(".json")])
                    if other is not None and other.netns_inode == state.netns_inode:
                        out.append(other)
        return out

    def _node_peers(self, state: AttachmentState) -> Iterator[AttachmentState]:
        for other in self.all():
            if other.node_inode == state.node_inode and \
                    (other.container_id, other.ifname) != (state.container_id, state.ifname):
                yield other

    def still_listed(self, state: AttachmentState, objs, *, node: bool) -> set[tuple]:
        """Keys of ``objs`` that another attachment still lists: the pod's other attachments
        (``node`` False) or every other attachment on the node (``node`` True).

        Stops reading state files as soon as every key is accounted for: a node with hundreds
        of attachments usually answers from its first file, not from all of them.
        """
        wanted = {o.key() for o in objs}
        found: set[tuple] = set()
        if not wanted:
            return found
        others = self._node_peers(state) if node else iter(self.pod_siblings(state))
        for other in others:
            d = other.desired
            found |= wanted & {o.key() for o in (*d.pod_owned, *d.pod_shared, *d.node_owned,
                                                 *d.node_shared)}
            if found == wanted:
                break
        return found


def _component(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise IOFailure(f"{name!r} cannot name a state file")
    return name


def write_atomic(path: str, text: str, *, durable: bool = True) -> None:
    """Replace ``path`` with ``text`` at once: a tmp file (0600) renamed over it, its directory
    created (0700) if need be. ``durable``: the file and then its directory are fsynced (the
    rename survives a crash). On OSError the tmp file is removed and the error raised."""
    directory = os.path.dirname(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, path)
        if durable:
            _fsync_dir(directory)
    except OSError:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

