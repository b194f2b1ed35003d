"""The whole-state snapshot for before/after comparisons, and its readable diff.

One namespace: ``namespace_state`` (rules of both families, every table's routes, links,
addresses, configured neighbours, the sysctls route-tune may write) plus its nft ruleset. A
snapshot: the pod and the node (a namespace that is gone is left out) and, given a state dir,
every file under it.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cniplugin.engine import commands as _engine
from cniplugin.kernel import netns as _netns
from cniplugin.lab.topology import OverlayLab, changed, namespace_state, netns_names, run, state_diff


def nft_ruleset(ns: str) -> str:
    return run("ip", "netns", "exec", ns, "nft", "list", "ruleset").stdout


def owned_objects(netns_path: str) -> set[str]:
    """Every route-tune object (protocol 231) in a netns, as the engine reads it, rendered."""
    fd = _netns.open_netns(netns_path)
    try:
        return {o.render() for o in _engine.owned_objects(fd)}
    finally:
        os.close(fd)


def ns_state(ns: str) -> dict:
    """The whole state of one namespace, its nft ruleset included."""
    return {**namespace_state(ns), "nft": nft_ruleset(ns)}


def without_dev(state: dict, dev: str) -> dict:
    """``ns_state`` minus every entry that belongs to interface ``dev`` (one that died with a
    netns, say); the nft ruleset is kept whole."""
    out: dict = {}
    for key, value in state.items():
        if isinstance(value, list):
            out[key] = [e for e in value if dev not in (e.get("dev"), e.get("ifname"))]
        elif isinstance(value, str):
            out[key] = value
        else:
            out[key] = {k: v for k, v in value.items() if f".{dev}." not in k}
    return out


def only_dev(state: dict, dev: str) -> dict:
    """The complement of ``without_dev``: the entries of ``state`` (``ns_state``) that belong to
    interface ``dev`` (list entries naming it, sysctls of it); the nft ruleset is left out."""
    out: dict = {}
    for key, value in state.items():
        if isinstance(value, list):
            out[key] = [e for e in value if dev in (e.get("dev"), e.get("ifname"))]
        elif isinstance(value, dict):
            out[key] = {k: v for k, v in value.items() if f".{dev}." in k}
    return out


def _names(value: object, addrs: set[str]) -> bool:
    """Whether ``value`` (an entry of ``ns_state``, nested) holds one of ``addrs`` as a whole
    string value."""
    if isinstance(value, dict):
        return any(_names(v, addrs) for v in value.values())
    if isinstance(value, list):
        return any(_names(v, addrs) for v in value)
    return isinstance(value, str) and value in addrs


def without_addrs(state: dict, addrs: set[str] | list[str]) -> dict:
    """``ns_state`` minus every list entry (rule, route, neighbour, address...) that names one
    of ``addrs``; sysctls and the nft ruleset are kept whole."""
    wanted = set(addrs)
    return {key: [e for e in value if not _names(e, wanted)] if isinstance(value, list) else value
            for key, value in state.items()}


def rules_sorted(state: dict) -> dict:
    """``state`` with its rules in one order: the kernel lists rules of one priority in insertion
    order, so a re-ADD that appends its own changes only their order."""
    return {**state, **{key: sorted(state[key], key=lambda r: json.dumps(r, sort_keys=True))
                        for key in ("rules4", "rules6") if key in state}}


#: What the state dir holds for monitoring, not for any attachment: the in-process request counts
#: (every request adds to them, a refused one too) and the engine's last pod drift round.
MONITORING = ("requests-in-process", "pod-drift.json")


def state_files(state_dir: Path) -> list[str]:
    """Every file and directory under the state dir (the empty ``attachments`` root and the
    monitoring entries excepted)."""
    out = []
    for path in sorted(state_dir.rglob("*")):
        rel = str(path.relative_to(state_dir))
        if rel != "attachments" and rel.split("/")[0] not in MONITORING:
            out.append(rel + ("/" if path.is_dir() else ""))
    return out


def snapshot(lab: OverlayLab, state_dir: Path | None = None,
             namespaces: list[str] | None = None) -> dict:
    """``{ns: ns_state}`` for the pod and the node (or ``namespaces``), + ``files`` of ``state_dir``."""
    present = netns_names(lab.prefix)
    wanted = [ns for ns in (namespaces or [lab.pod, lab.node]) if ns in present]
    with ThreadPoolExecutor(8) as pool:
        states = dict(zip(wanted, pool.map(ns_state, wanted)))
    return {**states, **({"files": state_files(state_dir)} if state_dir is not None else {})}


def snapshot_diff(before: dict, after: dict) -> str:
    """Readable difference of two snapshots ("" when equal)."""
    lines = []
    for key, a, b in changed(before, after):
        if key == "files":
            lines += [f"files: - {f}" for f in a or [] if f not in (b or [])]
            lines += [f"files: + {f}" for f in b or [] if f not in (a or [])]
            continue
        if a is None or b is None:
            lines.append(f"{key}: {'appeared' if a is None else 'disappeared'}")
            continue
        sub = state_diff({k: v for k, v in a.items() if k != "nft"},
                         {k: v for k, v in b.items() if k != "nft"})
        lines += [f"[{key}] {line}" for line in sub.splitlines()]
        if a.get("nft") != b.get("nft"):
            lines.append(f"[{key}] nft ruleset changed:\n--- before\n{a.get('nft')}\n+++ after\n"
                         f"{b.get('nft')}")
    return "\n".join(lines)


def assert_same(before: dict, after: dict, what: str = "") -> None:
    diff = snapshot_diff(before, after)
    assert diff == "", f"{what}: state differs from before:\n{diff}"
