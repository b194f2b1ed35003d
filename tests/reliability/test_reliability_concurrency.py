"""Concurrency (issue 8): many pods ADD and DEL at once on one node; two ADDs race on one netns.

The farm (``harness.lab.Farm``): one node netns, 32 pod netns each with a Calico-style
eth0, 8 rails shared by every pod (pod i's macvlan on rail k sits on the node's ``railk`` with
``172.16.1k.<20+i>``). Every chain ``[macvlan + static IPAM, route-tune]`` of every pod runs at the
same time through the Python libcni mimic (16 threads, shuffled order, so rails of one pod also
race each other). Afterwards every pod routes correctly (``ip route get`` from every rail source),
the node's hostRuleTable holds exactly one route per (pod, rail) and there is exactly one node
rule, neighbours likewise; a parallel DEL returns the node and every pod to their exact states.

Sizes in CI: resident mode 32 pods x 8 rails; in-process 32 pods x 1 rail (each in-process call
pays the interpreter start; 32 ADDs still race for the node lock and the shared node rule, and the
rails of one pod race in the next test). With ``--run-slow`` both engines run 32 pods x 8 rails
(for the resident engine a second run of its CI size: the full case is not skipped).

Two ADDs on one netns: the rails of one pod, and one attachment twice, started at the same
instant. A DEL race that leaked shared objects is pinned down deterministically by holding the
pod's lock (a flock on its netns inode, as the engine takes it) until both DELs wait for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cniplugin.lab.runtime import PluginEnv, PyRuntime
from harness.host import ROUTE_TUNE, wait_until
from harness.lab import NAMES, Farm
from harness.plugin import Reply
from harness.resident import Resident, served_count
from harness.snapshot import ns_state, snapshot_diff, state_files

pytestmark = [pytest.mark.netns]
THREADS = 16


def sizes(engine: str, slow: bool) -> tuple[int, int]:
    return (32, 8) if engine == "resident" or slow else (32, 1)


@pytest.mark.parametrize("slow", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["ci", "full"])
def test_many_pods_add_and_del_in_parallel(lab_session, engine, slow):
    """32 pods x N rails ADD in parallel: every pod correct, the node's table 500 holds exactly
    the expected routes (no loss, no duplicate), one rule, one neighbour per address; then a
    parallel DEL leaves the node and every pod exactly as before."""
    pods, rails = sizes(engine, slow)
    with Farm(NAMES.next(), rails=rails, pods=pods) as f, engine_env(f, engine) as penv:
        runtime = PyRuntime(f.node, penv)
        namespaces = [f.node] + [f.pod(i) for i in range(pods)]
        before = parallel_states(f, namespaces)
        chains = [(i, k) for i in range(pods) for k in range(1, rails + 1)]
        random.Random(8).shuffle(chains)

        def add(chain):
            i, k = chain
            return runtime.add(f.conflist(i, k), netns=f"/run/netns/{f.pod(i)}", ifname=f"net{k}",
                               container_id=f"pod{i}")

        def delete(chain):
            i, k = chain
            runtime.delete(f.conflist(i, k), netns=f"/run/netns/{f.pod(i)}", ifname=f"net{k}",
                           container_id=f"pod{i}")

        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(add, chains))
        assert_pods_route(f, pods, rails)
        assert_node_table(f, pods, rails)
        assert len([p for p in state_files(penv.state_dir) if p.endswith(".json")]) == pods * rails
        random.Random(9).shuffle(chains)
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(delete, chains))
        after = parallel_states(f, namespaces)
        diffs = {ns: snapshot_diff({ns: before[ns]}, {ns: after[ns]}) for ns in namespaces}
        assert not any(diffs.values()), "\n".join(d for d in diffs.values() if d)
        assert state_files(penv.state_dir) == []


def test_two_adds_on_one_netns_are_serialised(make_rig):
    """Two rounds of: net1 and net2 of the same pod ADDed at the same instant, then the SAME
    attachment (net1) ADDed twice at once. Every call succeeds, the two rails get distinct tables,
    shared objects exist once, CHECK passes, and DEL restores everything."""
    rig = make_rig("dual", rails=2)
    lab = rig.lab
    bare = rig.bare()
    prevs = {k: bare.add(k) for k in (1, 2)}
    before = rig.snapshot()
    for _ in range(2):
        replies = simultaneously(rig, [("ADD", 1), ("ADD", 2)], prevs)
        assert all(r.code == 0 for r in replies), "\n".join(map(str, replies))
        tables = rail_tables(lab)
        assert sorted(tables.values()) == [101, 102], tables
        assert_shared_once(lab)
        replies = simultaneously(rig, [("ADD", 1), ("ADD", 1)], prevs)
        assert all(r.code == 0 for r in replies), "\n".join(map(str, replies))
        assert rail_tables(lab) == tables  # a retried ADD keeps its table
        assert_shared_once(lab)
        for k in (1, 2):
            check = rig.rt("CHECK", k, prevs[k])
            assert check.code == 0, str(check)
        for k in (2, 1):
            assert rig.rt("DEL", k, prevs[k]).code == 0
        rig.assert_unchanged(before, "after concurrent ADDs on one netns")


def test_two_dels_on_one_netns_remove_the_shared_objects(make_rig):
    """net1 and net2 of one pod are DELed at once. The test holds the pod's and the node's locks
    (flocks on their netns inodes, exactly as the engine takes them) so that both DELs queue on
    the pod lock; it releases the pod lock and waits until the first DEL has done its pod side and
    waits for the node lock (and the second has either done its pod side too, or waits behind the
    first), then releases the node lock. The DEL that runs second must know the first one is gone
    and remove the pod's shared objects (table 100, eth0 rule, main routes, neighbours).
    (This caught a DEL that removed its state record after releasing the locks.)"""
    rig = make_rig("dual", rails=2)
    inprocess = rig.engine == "inprocess"
    lab = rig.lab
    bare = rig.bare()
    prevs = {k: bare.add(k) for k in (1, 2)}
    before = rig.snapshot()
    for k in (1, 2):
        assert rig.rt("ADD", k, prevs[k]).code == 0
    pod_path, node_path = f"/run/netns/{lab.pod}", f"/run/netns/{lab.node}"
    with flock_held(node_path):
        with flock_held(pod_path):
            procs = start(rig, [("DEL", 1), ("DEL", 2)], prevs)
            # resident: the server itself queues requests of one netns, so one waits here
            wait_until(lambda: len(locks_on(pod_path)[1]) == (2 if inprocess else 1))

        def both_past_the_pod_side_or_queued() -> bool:
            pod_holders = locks_on(pod_path)[0]
            node_waiters = locks_on(node_path)[1]
            if not inprocess:
                return len(node_waiters) == 1
            # both DELs wait for the node, or the first waits for it holding the pod lock
            return len(node_waiters) == 2 or (len(node_waiters) == 1 and node_waiters <= pod_holders)

        wait_until(both_past_the_pod_side_or_queued)
    replies = finish(procs)
    assert all(r.code == 0 for r in replies), "\n".join(map(str, replies))
    rig.assert_unchanged(before, "after two DELs that queued on the pod lock")


# ---------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def engine_env(f: Farm, engine: str):
    """A PluginEnv for the farm in ``engine`` mode (with a server in the node for resident)."""
    penv = PluginEnv(f.tmp / "penv", family="4", env={"ROUTE_TUNE_ENGINE": engine})
    if engine != "resident":
        yield penv
        return
    with Resident(f.node, penv) as server:
        penv.env.update(server.env)
        yield penv
    assert server.proc.returncode == 0, server.log()[-2000:]
    assert served_count(penv) > 0, "resident mode, but the server served nothing"


def parallel_states(f, namespaces: list[str]) -> dict[str, dict]:
    with ThreadPoolExecutor(8) as pool:
        return dict(zip(namespaces, pool.map(ns_state, namespaces)))


def assert_pods_route(f, pods: int, rails: int) -> None:
    """From every rail source: beyond-gateway traffic via netk; cluster and default via eth0."""
    def problems(i: int) -> list[str]:
        queries = []
        for k in range(1, rails + 1):
            queries += [(f"198.18.{k}.1", f.rail_ip(i, k)), ("10.233.0.10", f.rail_ip(i, k))]
        queries.append(("192.0.2.1", f.pod_ip(i)))
        got = f.route_get_many(f.pod(i), queries)
        out = []
        for k in range(1, rails + 1):
            beyond, cluster = got[2 * (k - 1)], got[2 * (k - 1) + 1]
            if (beyond.get("dev"), beyond.get("gateway")) != (f"net{k}", f"172.16.1{k}.254"):
                out.append(f"pod {i} from {f.rail_ip(i, k)}: want net{k} via gw, got {beyond}")
            if cluster.get("dev") != "eth0":
                out.append(f"pod {i} cluster from {f.rail_ip(i, k)}: want eth0, got {cluster}")
        if got[-1].get("dev") != "eth0":
            out.append(f"pod {i} eth0 reply: want eth0, got {got[-1]}")
        return out

    with ThreadPoolExecutor(8) as pool:
        found = [p for ps in pool.map(problems, range(pods)) for p in ps]
    assert not found, "\n".join(found)


def assert_node_table(f, pods: int, rails: int) -> None:
    """Table 500: exactly one route per (pod, rail) on that pod's cali; one rule; neighbours."""
    routes = json.loads(f.exec(f.node, "ip", "-j", "-4", "route", "show", "table", "500").stdout)
    got = sorted((r["dst"], r["dev"], r.get("protocol")) for r in routes)
    want = sorted((f.rail_ip(i, k), f"cali{i}", "231") for i in range(pods) for k in range(1, rails + 1))
    assert got == want, f"table 500: {len(got)} routes, want {len(want)}; " \
                        f"missing {sorted(set(want) - set(got))[:5]}, extra {sorted(set(got) - set(want))[:5]}"
    rules = [r for fam in ("-4", "-6")
             for r in json.loads(f.exec(f.node, "ip", "-j", fam, "rule", "show").stdout)
             if str(r.get("protocol")) == "231"]
    assert rules == [{"priority": 1000, "src": "all", "table": "500", "protocol": "231"}], rules
    neigh = json.loads(f.exec(f.node, "ip", "-j", "neigh", "show", "proto", "231").stdout)
    got_n = sorted((n["dst"], n["dev"]) for n in neigh)
    want_n = sorted((f.rail_ip(i, k), f"cali{i}") for i in range(pods) for k in range(1, rails + 1))
    assert got_n == want_n, f"{len(got_n)} node neighbours, want {len(want_n)}"


def start(rig, calls: list[tuple[str, int]], prevs: dict) -> list:
    """Start every (command, rail) route-tune call at once (stdin written, not waited for)."""
    procs = []
    for command, k in calls:
        conf = {**rig.conf(k), "prevResult": prevs[k]}
        rig.plugins_called += 1
        proc = subprocess.Popen(["ip", "netns", "exec", rig.lab.node, str(ROUTE_TUNE)],
                                env=rig.env(command, f"net{k}"), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append((proc, json.dumps(conf).encode()))
    for proc, stdin in procs:
        proc.stdin.write(stdin)
        proc.stdin.close()
    return [p for p, _ in procs]


def finish(procs: list) -> list[Reply]:
    return [Reply(p.wait(), p.stdout.read(), p.stderr.read()) for p in procs]


def simultaneously(rig, calls: list[tuple[str, int]], prevs: dict) -> list[Reply]:
    return finish(start(rig, calls, prevs))


@contextlib.contextmanager
def flock_held(path: str):
    """Hold an exclusive flock on ``path``'s inode for the body."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def locks_on(path: str) -> tuple[set[int], set[int]]:
    """(pids holding, pids waiting for) a flock on ``path``'s inode, from /proc/locks."""
    st = os.stat(path)
    tag = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders, waiters = set(), set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        waiting = fields[1] == "->"
        fields = fields[2:] if waiting else fields[1:]
        if fields[0] == "FLOCK" and fields[4] == tag:
            (waiters if waiting else holders).add(int(fields[3]))
    return holders, waiters


def rail_tables(lab) -> dict[str, int]:
    """Source address -> table of the pod's route-tune source rules (netK addresses only)."""
    out = {}
    for fam in lab.families:
        for rule in json.loads(lab.ip(lab.pod, "-j", f"-{fam}", "rule", "show")):
            if str(rule.get("protocol")) == "231" and rule.get("table") != "100":
                assert rule["src"] not in out, f"duplicate rule for {rule['src']}"
                out[rule["src"]] = int(rule["table"])
    by_rail: dict[int, set[int]] = {}
    for k in (1, 2):
        by_rail[k] = {t for src, t in out.items() if src in (lab.rail_ip(k, f) for f in lab.families)}
        assert len(by_rail[k]) == 1, f"net{k}'s families use tables {by_rail[k]}"
    return {f"net{k}": by_rail[k].pop() for k in (1, 2)}


def assert_shared_once(lab) -> None:
    """The pod's eth0 rule and the node rule exist once per family (no duplicate from a race)."""
    for ns, want in ((lab.pod, "100"), (lab.node, "500")):
        for fam in lab.families:
            rules = [r for r in json.loads(lab.ip(ns, "-j", f"-{fam}", "rule", "show"))
                     if str(r.get("protocol")) == "231" and r.get("table") == want]
            assert len(rules) == 1, f"{ns} IPv{fam}: {rules}"
