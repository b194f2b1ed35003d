"""Soak (issue 8): ADD/DEL cycles of one pod's chain, in both engine modes, must not grow anything.

Each cycle runs the whole chain ``[macvlan + host-local, route-tune]`` for net1 of a dual-stack pod
through the Python libcni mimic: ADD, then DEL. Checked after every cycle: the number of rules,
routes and configured neighbours in the pod and on the node is back to the pre-ADD count (and after
every 10th ADD it equals the first ADD's count); no state file survives a DEL. At checkpoints the whole
state is compared exactly. In resident mode the server's open fds (``/proc/<pid>/fd``) must come
back to the warmed-up count and its RSS must not keep growing.

CI: 100 cycles resident, 20 in-process (each in-process call pays an interpreter start);
``--run-slow``: 1,000 cycles in each mode.
"""

from __future__ import annotations

import pytest

from cniplugin.lab.topology import decode_many, ip_batch

pytestmark = [pytest.mark.netns]
WARM_UP = 5
#: RSS settles (allocator arenas, caches: about 700 KiB over the first ~700 requests here, flat
#: after) but must not keep growing: the last quarter of the run may add at most
#: ``RSS_TAIL_KIB`` (a leak of 1 KiB per cycle fails the 1,000-cycle run) and the whole run at
#: most ``RSS_TOTAL_KIB``.
RSS_TAIL_KIB = 256
RSS_TOTAL_KIB = 2048


def counts(lab) -> tuple:
    """(rules, routes, configured neighbours) in the pod and on the node, both families."""
    out = []
    for ns in (lab.pod, lab.node):
        rules4, routes, neigh = decode_many(ip_batch(["rule show", "route show table all", "neigh show"],
                                                      ns, "-j"))
        (rules6,) = decode_many(ip_batch(["rule show"], ns, "-j", "-6"))
        configured = [n for n in neigh if "PERMANENT" in n.get("state", []) or n.get("protocol")]
        out.append((len(rules4) + len(rules6), len(routes), len(configured)))
    return tuple(out)


def soak(rig, cycles: int) -> None:
    lab, pod = rig.lab, rig.pod()
    before = rig.snapshot()
    idle = counts(lab)
    pod.add(1)
    applied = counts(lab)
    reference = rig.snapshot()
    pod.delete(1)
    server = rig.server
    fds: list[int] = []
    rss: list[int] = []
    for cycle in range(1, cycles + 1):
        pod.add(1)
        if cycle % 10 == 0:
            assert counts(lab) == applied, f"cycle {cycle}: objects after ADD changed"
        pod.delete(1)
        assert counts(lab) == idle, f"cycle {cycle}: objects after DEL changed"
        assert rig.state_records() == [], f"cycle {cycle}: a state file survived DEL"
        if cycle in (WARM_UP, cycles // 2, 3 * cycles // 4, cycles):
            rig.assert_unchanged(before, f"cycle {cycle}")
            if server is not None:
                fds, rss = fds + [settled_fds(server)], rss + [server.rss_kib()]
    pod.add(1)
    assert owned(rig.snapshot()) == owned(reference), "route-tune's objects after the soak differ"
    pod.delete(1)
    if server is not None:
        assert fds[-1] <= fds[0], f"server fds grew: {fds} (after warm-up, 1/2, 3/4, end)"
        assert rss[-1] - rss[-2] <= RSS_TAIL_KIB and rss[-1] - rss[0] <= RSS_TOTAL_KIB, \
            f"server RSS kept growing: {rss} KiB (after warm-up, 1/2, 3/4, end)"


def owned(snapshot: dict) -> dict:
    """route-tune's own entries (protocol 231) of a snapshot: the macvlan's MAC (and with it its
    link-local address) is new on every ADD, everything route-tune installs must not be."""
    return {ns: {key: [e for e in state[key] if str(e.get("protocol")) == "231"]
                 for key in ("rules4", "rules6", "routes4", "routes6", "neigh")}
            for ns, state in snapshot.items() if ns != "files"}


def settled_fds(server) -> int:
    """The server's fd count once the last connection's thread has closed it (min of samples)."""
    return min(server.fd_count() for _ in range(20))


def test_soak(make_rig, engine):
    """100 (resident) / 20 (in-process) ADD/DEL cycles: nothing grows, state identical."""
    soak(make_rig("dual", rails=1), 100 if engine == "resident" else 20)


@pytest.mark.slow
def test_soak_long(make_rig):
    """1,000 ADD/DEL cycles."""
    soak(make_rig("dual", rails=1), 1000)
