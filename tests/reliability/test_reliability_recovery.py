"""Recovering a node by hand (issue 8, docs/failure-model.md): ``cni-route-tune orphans`` lists what
nobody owns any more and ``orphans --remove`` cleans it, leaving the node exactly as before.

Orphans are made the two ways a runtime leaves them: the pod's netns disappears and DEL never
comes (stale state files, their node rule still installed), and a route-tune node entry exists
that no state file lists (e.g. after the state dir was lost). The CLI runs inside the lab's node
netns with the lab's node defaults file, as an operator would run it on the node.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from harness.host import CNI_ROUTE_TUNE
from harness.lab import delete_pod_netns
from harness.snapshot import ns_state, snapshot_diff

pytestmark = [pytest.mark.netns]


def cli(rig, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "ROUTE_TUNE_DEFAULTS": str(rig.penv.defaults_file)}
    return subprocess.run(["ip", "netns", "exec", rig.lab.node, str(CNI_ROUTE_TUNE), *args],
                          env=env, capture_output=True, text=True, check=False)


@pytest.mark.parametrize("engine", ["inprocess"], indirect=True)
def test_orphans_lists_and_removes_what_nobody_owns(make_rig):
    """Pod netns deleted without DEL + a stray protocol-231 node rule: ``orphans`` reports both
    (exit 1), ``orphans --remove`` cleans them (exit 0), the node equals its pre-ADD state
    (minus the pod's veth end, which died with the pod), no state file is left, and a second
    ``orphans`` finds nothing (exit 0)."""
    rig = make_rig("dual", rails=2)
    lab = rig.lab
    node_before = rig.snapshot()[lab.node]
    rig.pod().add_all()
    delete_pod_netns(lab)
    lab.ip(lab.node, "rule", "add", "from", "all", "lookup", "777", "pref", "1001", "proto", "231")

    found = cli(rig, "orphans", "--json")
    assert found.returncode == 1, found.stderr
    report = json.loads(found.stdout)
    assert sorted(s["ifname"] for s in report["stale_states"]) == ["net1", "net2"], report
    assert any("777" in json.dumps(o) for o in report["objects"]), report

    removed = cli(rig, "orphans", "--remove")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert rig.state_records() == []
    node_after = ns_state(lab.node)
    assert snapshot_diff({"node": without_dev(node_before, lab.cali)}, {"node": node_after}) == ""

    again = cli(rig, "orphans")
    assert again.returncode == 0, again.stdout + again.stderr


def without_dev(state: dict, dev: str) -> dict:
    """``state`` minus every entry of interface ``dev`` (and its sysctls)."""
    out = {}
    for key, value in state.items():
        if isinstance(value, list):
            out[key] = [e for e in value if dev not in (e.get("dev"), e.get("ifname"))]
        elif isinstance(value, dict):
            out[key] = {k: v for k, v in value.items() if f".{dev}." not in k}
        else:
            out[key] = value
    return out
