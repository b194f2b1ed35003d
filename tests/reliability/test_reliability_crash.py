"""Crash anywhere (issue 8): SIGKILL route-tune at every step of ADD; DEL then returns pod and node
to exactly their state before ADD, and a fresh ADD converges.

The test-only fault hook (``cniplugin/engine/faults.py``) names every step: ``ROUTE_TUNE_FAULT_LOG``
records the points a clean ADD passes, ``ROUTE_TUNE_FAULT_AT=N`` acts at the N-th, with
``ROUTE_TUNE_FAULT_ACTION=kill`` (SIGKILL: nothing after it runs, no rollback) or ``raise`` (the
normal rollback runs). Points sit right AFTER each kernel change, so a kill always leaves a
half-applied attachment behind for DEL to clean.

Engine modes. The hook reads the environment of the process running the engine. In-process that
is the plugin process, so every point is swept with SIGKILL (and with ``raise``: ADD's own
rollback must leave nothing, before any DEL). In resident mode a kill kills the SERVER: a handful
of points are swept by starting the server with the fault variables, letting it die mid-ADD (the
shim answers code 11), restarting it over the stale socket, and running DEL / ADD / DEL through
the new server. Every point with SIGKILL and ``raise`` in resident mode, the dual-stack pod, the
second rail (shared objects already present), the underlay eth0 in every variant and kills
during DEL run with ``--run-slow``. CI sweeps every point of two ADDs with SIGKILL: overlay net1
and underlay eth0 (which creates the veth0 pair and the nftables table).

What "exactly before" means: the whole pod and node state (rules both families, every table,
links, configured neighbours, sysctls, nft ruleset) and every file under the state dir.
"""

from __future__ import annotations

import contextlib
import signal

import pytest

from harness.lab import UnderlayLab
from harness.plugin import assert_cni_error, assert_ok
from harness.resident import Resident, served_count
from harness.snapshot import snapshot_diff

pytestmark = [pytest.mark.netns]
KILL = {"ROUTE_TUNE_FAULT_ACTION": "kill"}
RAISE = {"ROUTE_TUNE_FAULT_ACTION": "raise"}


class Sweep:
    """One attachment's ADD and the states around it: ``pre`` (before ADD), ``post`` (after a
    clean ADD) and the fault ``points`` a clean ADD passes. ``call(command, extra_env)`` runs
    route-tune for that attachment."""

    def __init__(self, rig, call, recover_env: dict | None = None) -> None:
        self.rig, self.call = rig, call
        self.recover_env = recover_env or {}
        self.pre = rig.snapshot()
        self.points = self.count("ADD")
        self.post = rig.snapshot()
        assert_ok(call("DEL", {}))
        rig.assert_unchanged(self.pre, "after a clean ADD + DEL")

    def count(self, command: str) -> list[str]:
        """Run ``command`` cleanly with ``ROUTE_TUNE_FAULT_LOG`` in the REQUEST's environment; the
        points it passed. A resident server must ignore a request's fault variables (they are
        read from the server's own environment only), so there the log must not even appear."""
        log = self.rig.lab.tmp / "fault-points.log"
        log.unlink(missing_ok=True)
        assert_ok(self.call(command, {"ROUTE_TUNE_FAULT_LOG": str(log)}))
        if self.rig.engine == "resident":
            assert not log.exists(), "a request's ROUTE_TUNE_FAULT_LOG reached the resident engine"
            return []
        points = log.read_text().splitlines() if log.exists() else []
        assert points, "the fault hook recorded no point: is ROUTE_TUNE_FAULT_LOG wired?"
        return points

    def diff(self, want: dict) -> str:
        return snapshot_diff(want, self.rig.snapshot())

    def recover(self, command: str):
        """DEL / fresh ADD after a fault (through ``recover_env``'s engine when given)."""
        return self.call(command, self.recover_env)


def rail_sweep(rig, k: int, recover_env: dict | None = None) -> Sweep:
    """Rail k of a 2-rail overlay pod (interfaces attached; the rails before k configured, so
    their shared objects already exist)."""
    bare = rig.bare()
    prevs = {j: bare.add(j) for j in range(1, rig.lab.rails + 1)}
    for j in range(1, k):
        assert_ok(rig.rt("ADD", j, prevs[j]))
    return Sweep(rig, lambda command, env: rig.rt(command, k, prevs[k], extra_env=env), recover_env)


def underlay_sweep(rig, recover_env: dict | None = None) -> Sweep:
    """eth0 of an underlay pod (``UnderlayLab``): the first ADD creates the veth0 pair (its node
    end included) and route-tune's nftables table."""
    conf = {"cniVersion": "1.0.0", "name": "underlay", "type": "route-tune", "mode": "underlay",
            "prevResult": rig.lab.eth0_prev()}
    return Sweep(rig, lambda command, env: rig.exec_plugin(rig.env(command, "eth0", extra=env), conf),
                 recover_env)


def kill_sweep(s: Sweep, numbers: list[int]) -> list[str]:
    """For each N: ADD killed at point N, DEL, compare; fresh ADD, compare; DEL, compare."""
    problems = []
    for n in numbers:
        where = f"kill at point {n} ({s.points[n - 1]})"
        reply = s.call("ADD", {**KILL, "ROUTE_TUNE_FAULT_AT": str(n)})
        assert reply.code == -signal.SIGKILL and reply.stdout == b"", f"{where}: not killed:\n{reply}"
        problems += check_cycle(s, where)
    return problems


def check_cycle(s: Sweep, where: str) -> list[str]:
    """DEL -> pre; ADD -> post (converges); DEL -> pre. Returns the problems found."""
    problems = []
    reply = s.recover("DEL")
    if reply.code != 0:
        return [f"{where}: DEL failed:\n{reply}"]
    if diff := s.diff(s.pre):
        problems.append(f"{where}: DEL left:\n{diff}")
    reply = s.recover("ADD")
    if reply.code != 0:
        return problems + [f"{where}: fresh ADD failed:\n{reply}"]
    if diff := s.diff(s.post):
        problems.append(f"{where}: fresh ADD did not converge:\n{diff}")
    assert_ok(s.recover("DEL"))
    if diff := s.diff(s.pre):
        problems.append(f"{where}: final DEL left:\n{diff}")
    return problems


def raise_sweep(s: Sweep) -> list[str]:
    """For each N: ADD fails at point N (raise): the failed ADD alone leaves exactly ``pre``."""
    problems = []
    for n, name in enumerate(s.points, 1):
        reply = s.call("ADD", {**RAISE, "ROUTE_TUNE_FAULT_AT": str(n)})
        if reply.code != 1 or "injected fault" not in reply.stdout.decode():
            problems.append(f"raise at point {n} ({name}): want an error reply, got:\n{reply}")
        if diff := s.diff(s.pre):
            problems.append(f"raise at point {n} ({name}): rollback left (before any DEL):\n{diff}")
            assert_ok(s.call("DEL", {}))
    return problems


# ---------------------------------------------------------------------------- in-process

INPROCESS = pytest.mark.parametrize("engine", ["inprocess"], indirect=True)


@contextlib.contextmanager
def helper_engine(rig):
    """A resident engine next to an in-process rig, for the recovery calls of a kill sweep."""
    helper = Resident(rig.lab.node, rig.penv).start()
    try:
        yield {"ROUTE_TUNE_ENGINE": "resident", "ROUTE_TUNE_SOCKET": str(helper.sock)}
    finally:
        assert helper.stop() == 0, helper.log()[-2000:]
    assert served_count(rig.penv) > 0


def assert_none(problems: list[str]) -> None:
    assert not problems, "\n\n".join(problems)


@INPROCESS
@pytest.mark.parametrize("shape", ["overlay net1", "underlay eth0"])
def test_kill_at_every_point_of_add(make_rig, shape):
    """SIGKILL of the plugin process at every fault point of one ADD; after each: DEL == before,
    fresh ADD == a clean ADD, DEL == before. Overlay: net1 of a 2-rail IPv4 pod (it creates the
    pod's and the node's shared objects too). Underlay: eth0, whose ADD creates the veth0 pair
    and route-tune's nftables table. To fit CI, the recovery calls go to a resident engine on
    the same node (the realistic ``auto`` mix); ``--run-slow`` repeats it all in-process."""
    if shape.startswith("overlay"):
        rig = make_rig("4", rails=2)
        sweep = lambda env: rail_sweep(rig, 1, env)  # noqa: E731
    else:
        rig = make_rig("4", rails=1, lab_class=UnderlayLab)
        sweep = lambda env: underlay_sweep(rig, env)  # noqa: E731
    with helper_engine(rig) as recover_env:
        s = sweep(recover_env)
        problems = kill_sweep(s, list(range(1, len(s.points) + 1)))
    assert_none(problems)


@INPROCESS
def test_failure_at_every_point_rolls_back(make_rig):
    """ADD fails (raise) at every fault point of net1's ADD: its own rollback restores the exact
    pre-ADD state, before any DEL."""
    assert_none(raise_sweep(rail_sweep(make_rig("4", rails=2), 1)))


@pytest.mark.slow
@INPROCESS
@pytest.mark.parametrize("family,k", [("4", 1), ("4", 2), ("dual", 1), ("dual", 2), ("dual", 0)])
def test_kill_sweep_more_shapes(make_rig, family, k):
    """Every call in-process: net1 (IPv4), the second rail (shared objects already there: DEL
    must keep them), dual-stack rails, and dual-stack underlay eth0 (k=0); each with the kill
    and the raise sweep."""
    if k == 0:
        s = underlay_sweep(make_rig(family, rails=1, lab_class=UnderlayLab))
    else:
        s = rail_sweep(make_rig(family, rails=2), k)
    assert_none(kill_sweep(s, list(range(1, len(s.points) + 1))) + raise_sweep(s))


@pytest.mark.slow
@INPROCESS
def test_kill_at_every_point_of_del(make_rig):
    """SIGKILL at every fault point of DEL: a retried DEL finishes, the state is as before ADD,
    and ADD works again."""
    s = rail_sweep(make_rig("dual", rails=2), 1)
    assert_ok(s.call("ADD", {}))
    del_points = s.count("DEL")
    problems = []
    for n in range(1, len(del_points) + 1):
        assert_ok(s.call("ADD", {}))
        reply = s.call("DEL", {**KILL, "ROUTE_TUNE_FAULT_AT": str(n)})
        assert reply.code == -signal.SIGKILL, f"DEL point {n}: not killed:\n{reply}"
        reply = s.call("DEL", {})
        if reply.code != 0:
            problems.append(f"DEL killed at {n} ({del_points[n - 1]}): retried DEL failed:\n{reply}")
        elif diff := s.diff(s.pre):
            problems.append(f"DEL killed at {n} ({del_points[n - 1]}): retried DEL left:\n{diff}")
    assert_none(problems)


# ---------------------------------------------------------------------------- resident

RESIDENT = pytest.mark.parametrize("engine", ["resident"], indirect=True)


def replace_server(rig, env: dict[str, str] | None = None) -> Resident:
    """Replace the rig's server by a new one (its OWN environment carrying ``env``)."""
    rig.server.stop()
    rig.server = Resident(rig.lab.node, rig.penv, extra_env=env).start()
    return rig.server


def resident_points(s: Sweep) -> list[str]:
    """The ADD's fault points, logged by a server started with ``ROUTE_TUNE_FAULT_LOG``."""
    log = s.rig.lab.tmp / "fault-points.log"
    log.unlink(missing_ok=True)
    replace_server(s.rig, {"ROUTE_TUNE_FAULT_LOG": str(log)})
    assert_ok(s.call("ADD", {}))
    assert_ok(s.call("DEL", {}))
    replace_server(s.rig)
    return [p for p in log.read_text().splitlines() if not p.startswith("del:")]


def server_kill_sweep(s: Sweep, numbers: list[int]) -> list[str]:
    problems = []
    for n in numbers:
        where = f"server killed at point {n} ({s.points[n - 1]})"
        server = replace_server(s.rig, {**KILL, "ROUTE_TUNE_FAULT_AT": str(n)})
        assert_cni_error(s.call("ADD", {}), 11)  # the shim: the engine took the request and died
        assert server.proc.wait() == -signal.SIGKILL, f"{where}: {server.log()[-2000:]}"
        replace_server(s.rig)  # over the stale socket the dead server left behind
        problems += check_cycle(s, where)
    return problems


@RESIDENT
def test_server_killed_mid_add_then_del_cleans(make_rig):
    """The resident server is SIGKILLed at the first kernel change, in the middle, at the first
    node change and after the state is marked applied; the shim answers code 11, a restarted
    server takes over the stale socket, DEL == before, fresh ADD converges, DEL == before."""
    s = rail_sweep(make_rig("4", rails=2), 1)
    s.points = names = resident_points(s)
    first_pod = next(i for i, p in enumerate(names, 1) if p.startswith("pod:"))
    first_node = next(i for i, p in enumerate(names, 1) if p.startswith("node:"))
    numbers = sorted({first_pod, (first_pod + first_node) // 2, first_node, len(names)})
    assert_none(server_kill_sweep(s, numbers))


@RESIDENT
def test_rollback_of_an_applied_add_is_not_repaired_back(make_rig):
    """ADD fails after its record says applied, with the engine's node repair running: the
    rollback removes the node rule eth0's ADD created, and the repair (which keeps applied
    records' node objects in place) must not put it back. Underlay eth0, the one attachment that
    owns the rule alone; the --run-slow sweep below covers every point."""
    s = underlay_sweep(make_rig("4", rails=1, lab_class=UnderlayLab))
    s.points = resident_points(s)
    replace_server(s.rig, {**RAISE, "ROUTE_TUNE_FAULT_AT": str(s.points.index("state:applied") + 1)})
    reply = s.call("ADD", {})
    replace_server(s.rig)
    assert reply.code == 1 and "injected fault" in reply.stdout.decode(), reply
    diff = s.diff(s.pre)
    assert not diff, f"rollback left:\n{diff}"


@pytest.mark.slow
@RESIDENT
@pytest.mark.parametrize("shape", ["overlay net1", "underlay eth0"])
def test_server_killed_or_failing_at_every_point(make_rig, shape):
    """Every point, resident: the server SIGKILLed (then restarted) and the server raising."""
    if shape.startswith("overlay"):
        s = rail_sweep(make_rig("4", rails=2), 1)
    else:
        s = underlay_sweep(make_rig("4", rails=1, lab_class=UnderlayLab))
    s.points = resident_points(s)
    problems = server_kill_sweep(s, list(range(1, len(s.points) + 1)))
    for n, name in enumerate(s.points, 1):
        replace_server(s.rig, {**RAISE, "ROUTE_TUNE_FAULT_AT": str(n)})
        reply = s.call("ADD", {})
        if reply.code != 1 or "injected fault" not in reply.stdout.decode():
            problems.append(f"raise at {n} ({name}): want an error reply, got:\n{reply}")
        if diff := s.diff(s.pre):
            problems.append(f"raise at {n} ({name}): rollback left:\n{diff}")
    replace_server(s.rig)
    assert_none(problems)
