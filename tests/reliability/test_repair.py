"""The resident engine repairs node state that something else removed (docs/repair.md).

Real namespaces: the engine (``cni-route-tune serve``) runs in the lab's node netns, route-tune
attaches rails, then something deletes node objects as systemd-networkd, an operator or a
firewall reload would. Each time the whole pod and node state (and the state files) must come
back to exactly the state after ADD (nothing missing, nothing duplicated), and a DEL must still
leave everything as it was before ADD. An attachment whose DEL has begun is never resurrected;
a deleter that keeps deleting meets back-off; an engine started after a deletion repairs it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import threading

import pytest

from cniplugin.engine import observe
from cniplugin.engine.repair import Repairer, Settings
from cniplugin.kernel import netns as _netns
from harness.host import wait_until
from harness.lab import UnderlayLab
from harness.plugin import assert_ok
from harness.resident import Resident
from harness.snapshot import snapshot_diff

pytestmark = [pytest.mark.netns]
RESIDENT = pytest.mark.parametrize("engine", ["resident"], indirect=True)
INPROCESS = pytest.mark.parametrize("engine", ["inprocess"], indirect=True)


def wait_for(rig, want: dict, what: str) -> None:
    """Poll until the whole snapshot equals ``want`` (the diff is in the failure message)."""
    last: list[str] = []

    def same() -> bool:
        last[:] = [snapshot_diff(want, rig.snapshot())]
        return last[0] == ""
    try:
        wait_until(same, what=what)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{last[0]}") from None


def networkd_flush(lab) -> None:
    """What systemd-networkd does with ManageForeignRoutingPolicyRules/-Routes=yes: every rule
    but local/main/default and every route outside main and local, both families, in one go."""
    for fam in ("4", "6"):
        lines = [f"rule del pref {rule['priority']} table {rule['table']}"
                 for rule in json.loads(lab.ip(lab.node, "-j", f"-{fam}", "rule", "show"))
                 if rule["priority"] not in (0, 32766, 32767)]
        tables = {r.get("table", "main") for r in
                  json.loads(lab.ip(lab.node, "-j", f"-{fam}", "route", "show", "table", "all"))}
        lines += [f"route flush table {t}" for t in sorted(tables - {"main", "local"})]
        batch = lab.tmp / "networkd.batch"
        batch.write_text("\n".join(lines) + "\n")
        lab.ip(lab.node, f"-{fam}", "-batch", str(batch))


DELETERS = {
    "the node rule": lambda lab: lab.ip(lab.node, "rule", "del", "pref", "1000", "table", "500"),
    "table 500 flushed": lambda lab: [lab.ip(lab.node, f"-{fam}", "route", "flush", "table", "500")
                                      for fam in ("4", "6")],
    "one node route": lambda lab: lab.ip(lab.node, "-6", "route", "del", lab.rail_ip(2, "6"),
                                         "table", "500"),
    "one node neighbour": lambda lab: lab.ip(lab.node, "neigh", "del", lab.rail_ip(1, "4"),
                                             "dev", lab.cali),
    "networkd's flush": networkd_flush,
}


def repairs_logged(rig) -> int:
    return rig.server.log().count("repaired ")


def pod_nft(lab, *words: str) -> None:
    subprocess.run(["ip", "netns", "exec", lab.pod, "nft", *words], check=True)


def add_both_rails(rig) -> tuple[dict, object, object]:
    """Rails 1 and 2 ADDed through the rig's engine: their prevResults, and the snapshots
    before and after."""
    bare = rig.bare()
    prevs = {k: bare.add(k) for k in (1, 2)}
    pre = rig.snapshot()
    for k, prev in prevs.items():
        assert_ok(rig.rt("ADD", k, prev))
    return prevs, pre, rig.snapshot()


@RESIDENT
def test_node_objects_are_put_back_exactly(make_rig):
    """Dual stack, two rails: each deletion is repaired to exactly the post-ADD state; DEL then
    returns to the pre-ADD state."""
    rig = make_rig("dual", rails=2)
    prevs, pre, post = add_both_rails(rig)
    for name, delete in DELETERS.items():
        repaired = repairs_logged(rig)
        delete(rig.lab)
        wait_until(lambda: repairs_logged(rig) > repaired, what=f"the engine to repair {name}")
        wait_for(rig, post, f"the engine to repair {name} exactly")
    for k, prev in reversed(prevs.items()):
        assert_ok(rig.rt("DEL", k, prev))
    rig.assert_unchanged(pre, "after DEL of repaired attachments")
    assert "could not repair" not in rig.server.log()


@RESIDENT
def test_underlay_nft_table_is_put_back(make_rig):
    """Underlay eth0: a firewall reload in the pod (``nft flush ruleset``) drops route-tune's
    reply-steering table; the engine recreates exactly it. A flush of the node's tables too."""
    rig = make_rig("4", rails=1, lab_class=UnderlayLab)
    conf = {"cniVersion": "1.0.0", "name": "underlay", "type": "route-tune", "mode": "underlay",
            "prevResult": rig.lab.eth0_prev()}
    pre = rig.snapshot()
    assert_ok(rig.exec_plugin(rig.env("ADD", "eth0"), conf))
    post = rig.snapshot()
    pod_nft(rig.lab, "flush", "ruleset")
    try:
        wait_until(lambda: "nft_table" in rig.server.log(), what="the nft table repaired")
    except AssertionError:
        raise AssertionError(rig.server.log()[-3000:]) from None
    wait_for(rig, post, "the engine to recreate the pod's nft table")
    networkd_flush(rig.lab)
    pod_nft(rig.lab, "delete", "table", "inet", "route_tune")
    wait_for(rig, post, "the engine to repair the node and the nft table")
    assert_ok(rig.exec_plugin(rig.env("DEL", "eth0"), conf))
    rig.assert_unchanged(pre, "after DEL")


@RESIDENT
def test_a_del_in_flight_is_not_undone(make_rig):
    """DEL of rail 1 dies (SIGKILL, in-process) after removing its first node object; the
    engine must not put back anything of rail 1, even what is deleted afterwards, while it does
    repair rail 2 (which also shows it has seen the events). A retried DEL finishes."""
    rig = make_rig("4", rails=2)
    bare = rig.bare()
    prevs = {k: bare.add(k) for k in (1, 2)}
    pre = rig.snapshot()
    inprocess = {"ROUTE_TUNE_ENGINE": "inprocess"}
    for k in (1, 2):
        assert_ok(rig.rt("ADD", k, prevs[k]))
    points_log = rig.lab.tmp / "del-points.log"
    assert_ok(rig.rt("DEL", 1, prevs[1], extra_env={**inprocess, "ROUTE_TUNE_FAULT_LOG": str(points_log)}))
    points = points_log.read_text().splitlines()
    first_node = next(i for i, p in enumerate(points, 1) if p.startswith("del:node:"))
    assert_ok(rig.rt("ADD", 1, prevs[1]))
    reply = rig.rt("DEL", 1, prevs[1], extra_env={
        **inprocess, "ROUTE_TUNE_FAULT_AT": str(first_node), "ROUTE_TUNE_FAULT_ACTION": "kill"})
    assert reply.code < 0, str(reply)
    lab = rig.lab
    rail1_route = lambda: lab.rail_ip(1, "4") in lab.ip(lab.node, "route", "show", "table", "500")  # noqa: E731
    rail1_neigh = lambda: lab.rail_ip(1, "4") in lab.ip(lab.node, "neigh", "show", "dev", lab.cali)  # noqa: E731
    assert not (rail1_route() and rail1_neigh()), "the killed DEL removed nothing on the node"
    if rail1_route():
        lab.ip(lab.node, "route", "del", lab.rail_ip(1, "4"), "table", "500")
    if rail1_neigh():
        lab.ip(lab.node, "neigh", "del", lab.rail_ip(1, "4"), "dev", lab.cali)
    lab.ip(lab.node, "route", "del", lab.rail_ip(2, "4"), "table", "500")
    wait_until(lambda: lab.rail_ip(2, "4") in lab.ip(lab.node, "route", "show", "table", "500"),
               what="the engine to repair rail 2's node route")
    assert not rail1_route() and not rail1_neigh(), "the engine resurrected rail 1 during its DEL"
    for k in (1, 2):
        assert_ok(rig.rt("DEL", k, prevs[k]))
    rig.assert_unchanged(pre, "after the retried DEL")


class Events(observe.Observer):
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict]] = []

    def event(self, name: str, fields: dict) -> None:
        self.seen.append((name, dict(fields)))

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.seen if n == name)


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelname, record.getMessage()))


@INPROCESS
def test_a_repeated_deleter_meets_backoff(make_rig):
    """Something deletes the node rule again and again: the engine's repairs back off
    exponentially (a warning and ``repair_backoff`` events), so the number of repairs stays small
    however often it is deleted; once the deleter stops, the rule comes back."""
    rig = make_rig("4", rails=1)
    prev = rig.bare().add(1)
    pre = rig.snapshot()
    assert_ok(rig.rt("ADD", 1, prev))
    post = rig.snapshot()
    events = Events()
    observe.install(events)
    node_fd = _netns.open_netns(f"/run/netns/{rig.lab.node}")
    repairer = Repairer(str(rig.penv.state_dir), Settings(backoff_base=0.25, backoff_max=1.0),
                        node_fd=node_fd)
    os.close(node_fd)
    stop = threading.Event()
    deletions = 0

    def deleter() -> None:
        nonlocal deletions
        while not stop.is_set():
            if "lookup 500" in rig.lab.ip(rig.lab.node, "rule", "show"):
                rig.lab.ip(rig.lab.node, "rule", "del", "pref", "1000", "table", "500")
                deletions += 1
    lines = Lines()
    logger = logging.getLogger("cniplugin.repair")
    logger.addHandler(lines)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        repairer.start()
        thread = threading.Thread(target=deleter)
        thread.start()
        wait_until(lambda: events.count("repair_backoff") >= 3, what="back-off to escalate")
        stop.set()
        thread.join()
        wait_for(rig, post, "the rule back once the deleter stopped")
    finally:
        stop.set()
        repairer.stop()
        observe.install(None)
        logger.removeHandler(lines)
        logger.setLevel(level)
    repairs = events.count("repair")
    assert {f["kind"] for n, f in events.seen} == {"rule"}, events.seen
    # Pauses 0.25, 0.5, 1, 1 ...: repairs grow with time, never with the deletion rate.
    assert repairs <= 3 + events.count("repair_backoff"), (repairs, deletions)
    assert deletions >= repairs - 1
    assert any(level == "WARNING" and re.search(r"keeps being removed .* again in \d+ s", text)
               for level, text in lines.lines), lines.lines
    assert_ok(rig.rt("DEL", 1, prev))
    rig.assert_unchanged(pre, "after DEL")


@RESIDENT
def test_an_engine_started_after_the_deletion_repairs_at_startup(make_rig):
    """No engine runs while networkd flushes the node; the engine started afterwards puts
    everything back before any event. DEL then returns to the pre-ADD state."""
    rig = make_rig("4", rails=2)
    prevs, pre, post = add_both_rails(rig)
    rig.server.stop()
    networkd_flush(rig.lab)
    assert snapshot_diff(post, rig.snapshot()) != ""
    rig.server = Resident(rig.lab.node, rig.penv).start()
    wait_for(rig, post, "the new engine to repair at start-up")
    for k, prev in reversed(prevs.items()):
        assert_ok(rig.rt("DEL", k, prev))
    rig.assert_unchanged(pre, "after DEL of the attachments the new engine repaired")
