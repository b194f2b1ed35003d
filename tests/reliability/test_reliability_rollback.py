"""A failed rollback never loses track (docs/failure-model.md): when ADD fails and its rollback
cannot remove something, that object stays recorded (``rollback-incomplete``), the ADD's error
names it, and the next DEL, a GC or the resident engine's reconcile removes it.

Fault points (``engine/faults.py``): ``ROUTE_TUNE_FAULT_AT=N,M`` with ``raise`` fails the ADD
right after its first node route (N) and then the rollback's first undo step (M = N + 1: the
undo of that very change), so the node route stays in the kernel.
"""

from __future__ import annotations

import json

import pytest

from cniplugin.records.objects import object_from_dict
from harness.host import wait_until
from harness.plugin import assert_cni_error, assert_ok
from harness.resident import Resident

pytestmark = [pytest.mark.netns, pytest.mark.parametrize("engine", ["inprocess"], indirect=True)]


def failing_add(rig, prev: dict) -> tuple[str, dict]:
    """ADD whose rollback cannot undo its first node change: that change's name, the error."""
    log = rig.lab.tmp / "points.log"
    log.unlink(missing_ok=True)
    assert_ok(rig.rt("ADD", 1, prev, extra_env={"ROUTE_TUNE_FAULT_LOG": str(log)}))
    assert_ok(rig.rt("DEL", 1, prev))
    points = log.read_text().splitlines()
    n = next(i for i, p in enumerate(points, 1) if p.startswith("node:ip route"))
    reply = rig.rt("ADD", 1, prev, extra_env={"ROUTE_TUNE_FAULT_ACTION": "raise",
                                              "ROUTE_TUNE_FAULT_AT": f"{n},{n + 1}"})
    return points[n - 1].removeprefix("node:"), assert_cni_error(reply, 999)


def assert_tracked(rig, left: str, err: dict) -> None:
    """The object is in the kernel, in the state file (and nothing else is), and in the error."""
    (record,) = rig.state_records()
    state = json.loads((rig.penv.state_dir / record).read_text())
    assert state["phase"] == "rollback-incomplete", state
    desired = state["desired"]
    lists = ("pod_owned", "pod_shared", "node_owned", "node_shared", "displaced")
    listed = {k: [object_from_dict(o).render() for o in desired[k]] for k in lists}
    assert listed == {**{k: [] for k in lists}, "node_owned": [left]}, desired
    assert left in err["msg"] and "could not undo 1 change(s)" in err["msg"], err
    assert "the next DEL, GC or the resident engine removes them" in err["msg"], err
    assert str(rig.penv.state_dir / record) in err["msg"], err
    dst = left.split()[3]
    assert dst in rig.lab.ip(rig.lab.node, "route", "show", "table", "500"), left


@pytest.mark.parametrize("finisher", ["DEL", "GC", "engine"])
def test_what_a_rollback_left_is_recorded_and_removed(make_rig, finisher):
    rig = make_rig("4", rails=1)
    prev = rig.bare().add(1)
    pre = rig.snapshot()
    left, err = failing_add(rig, prev)
    assert left.startswith("ip route replace"), left
    assert_tracked(rig, left, err)
    if finisher == "DEL":
        assert_ok(rig.rt("DEL", 1, prev))
    elif finisher == "GC":
        conf = {**rig.conf(1, cni_version="1.1.0"), "cni.dev/valid-attachments": []}
        assert_ok(rig.exec_plugin(rig.env("GC", "net1"), conf))
    else:
        with Resident(rig.lab.node, rig.penv):
            wait_for_no_records(rig)
    rig.assert_unchanged(pre, f"after {finisher} finished the failed ADD's leftovers")


def test_a_retried_add_removes_the_leftovers_first(make_rig):
    """A retried ADD finds the record of the failed one: it removes what is left, then applies;
    DEL returns to the state before either."""
    rig = make_rig("4", rails=1)
    prev = rig.bare().add(1)
    pre = rig.snapshot()
    failing_add(rig, prev)
    assert_ok(rig.rt("ADD", 1, prev))
    assert_ok(rig.rt("DEL", 1, prev))
    rig.assert_unchanged(pre, "after a retried ADD and DEL")


def wait_for_no_records(rig) -> None:
    wait_until(lambda: not rig.state_records(), what="the engine to remove the leftover record")
