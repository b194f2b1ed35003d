"""The CLI's full reads return the engine's object types through the engine's decoder: a
unicast route reads the same both ways, and rules with port or uid ranges are shown."""

from __future__ import annotations

import dataclasses
import os

import pytest

from cniplugin.cli import live as _live
from cniplugin.cli.iptext import text
from cniplugin.kernel import netlink as _netlink
from cniplugin.kernel import netns as _netns
from harness.lab import VETH_PAIR, scratch_netns

SETUP = [*VETH_PAIR, *"""\
route add 203.0.113.0/24 via 10.9.0.254 dev va table 200 proto 231 metric 3
route add blackhole 198.51.100.0/24 table 200
route add 100.64.0.0/10 table 200 nexthop via 10.9.0.254 dev va nexthop via 10.8.0.254 dev vb
rule add pref 205 ipproto udp sport 1000-2000 dport 53 lookup 200
rule add pref 206 uidrange 100-200 lookup 200
neigh add 10.9.0.254 lladdr 02:00:00:00:00:01 dev va nud permanent proto 231
""".splitlines()]


@pytest.fixture(scope="module")
def pod_fd(lab_session):
    with scratch_netns("reads", SETUP) as name:
        fd = _netns.open_netns(f"/run/netns/{name}")
        try:
            yield fd
        finally:
            os.close(fd)


def test_engine_and_cli_read_the_same_route(pod_fd):
    with _netlink.Netlink.bound_to(pod_fd) as nl:
        engine = nl.routes(4, table=200)
        cli = nl.all_routes(4, table=200)
    assert [r.dst for r in engine] == ["100.64.0.0/10", "100.64.0.0/10", "203.0.113.0/24"]
    assert {r.dev for r in engine if r.dst == "100.64.0.0/10"} == {"va", "vb"}
    [unicast] = [r for r in cli if r.dst == "203.0.113.0/24"]
    assert unicast == engine[-1] and unicast.owned
    assert sorted(text(r) for r in cli) == [
        "100.64.0.0/10 nexthop via 10.9.0.254 dev va nexthop via 10.8.0.254 dev vb",
        "203.0.113.0/24 via 10.9.0.254 dev va proto 231 metric 3",
        "blackhole 198.51.100.0/24",
    ]
    [multipath] = [r for r in cli if r.nexthops]
    assert multipath.nexthops == (("va", "10.9.0.254"), ("vb", "10.8.0.254"))


def test_snapshot_shows_ranges_and_neighbour_state(pod_fd):
    snap = _live.snapshot(pod_fd)
    texts = [text(r) for r in snap.rules_of(4)]
    assert "205: from all ipproto 17 sport 1000-2000 dport 53-53 lookup 200" in texts
    assert "206: from all uidrange 100-200 lookup 200" in texts
    assert all(r.selectors for r in snap.rules if r.priority in (205, 206))
    [neigh] = snap.neighbours
    assert (neigh.permanent, neigh.owned) == (True, True)
    assert dataclasses.replace(neigh, permanent=True, proto=231) == neigh
