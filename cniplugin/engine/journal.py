"""Applying objects with a journal, and undoing a journal (ADD's rollback).

Every real change is journaled with what was there before it; an object that is already
present and identical is not a change. ``undo`` walks the journal backwards and keeps going
after errors (a rollback must try every step); ``kept`` turns the steps it could not undo into
the record that keeps track of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from cniplugin.engine import faults as _faults
from cniplugin.records.objects import (Desired, KernelObject, LinkAttr, NftTable, Route, Sysctl,
                                       Veth)
from cniplugin.records.values import value

#: Kinds whose live value is read one by one (the others come from the request's dumps).
READ_KINDS = (Sysctl, LinkAttr, Veth, NftTable)


@value(frozen=False)
class Step:
    side: str               # pod | node
    action: str             # applied | displaced
    obj: KernelObject
    previous: object = None  # live object/value before we touched it (None: absent)
    shared: bool = False


class Applier:
    """Applies objects on one side through session ``nl``, journaling every real change."""

    def __init__(self, nl, side: str, live: list[KernelObject], journal: list[Step]):
        self.nl, self.side, self.journal = nl, side, journal
        self.live = {o.key(): o for o in live}

    def apply(self, obj: KernelObject, shared: bool) -> None:
        if isinstance(obj, (Sysctl, LinkAttr)):
            previous = self.nl.read_attr(obj)
            if previous == obj.value:
                return
        elif isinstance(obj, READ_KINDS):
            previous = self.nl.read(obj)
            if previous == obj:
                return
        else:
            previous = self.live.get(obj.key())
            if previous == obj:
                return
            if previous is None and isinstance(obj, Route):
                # Nothing of ours holds the key: create, never overwrite a foreign route (it
                # raises); a route of ours the filtered read did not show is returned, replaced.
                previous = self.nl.create_route(obj)
                self.journal.append(Step(self.side, "applied", obj, previous, shared))
                _faults.point(f"{self.side}:{obj.render()}")
                return
        self.nl.apply(obj)
        self.journal.append(Step(self.side, "applied", obj, previous, shared))
        _faults.point(f"{self.side}:{obj.render()}")

    def displace(self, route: Route) -> None:
        self.nl.remove(route)
        self.journal.append(Step(self.side, "displaced", route))
        _faults.point(f"{self.side}:displace {route.render()}")


def undo(nl, steps: list[Step],
         still_listed: Callable[[KernelObject], bool]) -> list[tuple[Step, str]]:
    """Reverse ``steps``; returns the steps that could not be undone, each with its error."""
    failed = []
    for step in reversed(steps):
        obj, previous = step.obj, step.previous
        try:
            _faults.point(f"undo:{step.side}:{obj.render()}")
            if step.action == "displaced":
                nl.restore(obj)
            elif isinstance(obj, (Sysctl, LinkAttr)):
                nl.restore(obj, previous)
            elif isinstance(obj, (Veth, NftTable)):
                if previous is None:
                    nl.remove(obj)
                # else: we only repaired an existing pair/table; leave it repaired
            elif previous is not None:
                nl.apply(previous)
            elif not (step.shared and still_listed(obj)):
                nl.remove(obj)
        except Exception as err:  # rollback must try every step; report the rest
            failed.append((step, f"{obj.render()}: {err}"))
    return failed


_CATEGORIES = ("pod_owned", "pod_shared", "node_owned", "node_shared")


def kept(base: Desired, plan: Desired, steps: list[Step]) -> Desired:
    """``base`` plus the objects of ``steps`` (changes a rollback could not undo), each in the
    category ``plan`` lists it in, so that DEL removes (or restores) exactly them."""
    added: dict[str, list] = {name: list(getattr(base, name)) for name in
                              (*_CATEGORIES, "displaced")}
    for step in steps:
        if step.action == "displaced":
            name = "displaced"
        else:
            key = step.obj.key()
            name = next((n for n in _CATEGORIES if any(o.key() == key for o in getattr(plan, n))),
                        f"{step.side}_owned")
        if all(o.key() != step.obj.key() for o in added[name]):
            added[name].append(step.obj)
    return dataclasses.replace(base, **{name: tuple(objs) for name, objs in added.items()})
