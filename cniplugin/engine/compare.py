"""What is installed against what is recorded: CHECK's comparison, shared by CHECK, the CLI's
``verify``/``show``, the resident engine's pod drift check and its node repair."""

from __future__ import annotations

from cniplugin.engine.gather import owned_node_objects, owned_pod_objects, sessions_bound_to
from cniplugin.engine.journal import READ_KINDS
from cniplugin.engine.store import AttachmentState
from cniplugin.records.objects import KernelObject, LinkAttr, Sysctl, apply_order
from cniplugin.records.values import value

__all__ = ["Drift", "compare", "diff_state"]


@value
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


def diff_state(state: AttachmentState, pod_fd: int, node_fd: int, *,
               node_side: bool = True) -> list[Drift]:
    """Recorded intent of one attachment vs the kernel (the CLI's verify uses this too).

    ``node_side`` False compares the pod side only (the pod drift check): no node dumps. The
    node session is opened either way: reading the underlay veth pair needs its node end.
    """
    desired = state.desired
    drifts: list[Drift] = []
    with sessions_bound_to(pod_fd, node_fd) as (pod_nl, node_nl):
        drifts += compare(pod_nl, "pod", desired.pod_objects(), owned_pod_objects(pod_nl))
        if node_side and desired.node_objects():
            live = owned_node_objects(node_nl, desired.host_rule_table, desired.host_peer,
                                      by_peer=False)
            drifts += compare(node_nl, "node", desired.node_objects(), live)
    return drifts


def compare(nl, side: str, expected: list[KernelObject], live: list[KernelObject]) -> list[Drift]:
    """``expected`` vs the kernel through session ``nl`` (``live``: its rules, routes and
    neighbours as dumped; the other kinds are read one by one)."""
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
