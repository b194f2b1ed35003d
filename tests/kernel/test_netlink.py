"""The netlink adapter's `route get` reports the table the rules selected, for both families."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def policy_netns(make_netns):
    # `ip rule` takes the family from -6, not from the address: the IPv6 rule goes in lines6.
    name = make_netns("policy", [
        "addr add 10.9.0.1/32 dev lo", "addr add fd00:9::1/128 dev lo nodad",
        "route add default dev lo table 100", "route add ::/0 dev lo table 100",
        "rule add from 10.9.0.1 lookup 100 pref 100"],
        ["rule add from fd00:9::1 lookup 100 pref 100"])
    return f"/run/netns/{name}"


@pytest.mark.parametrize("dst, src", [("10.9.9.9", "10.9.0.1"), ("fd00:9::9", "fd00:9::1")])
def test_route_get_reports_the_policy_table(policy_netns, dst, src):
    from cniplugin.kernel import netlink as _netlink
    from cniplugin.kernel import netns as _netns
    fd = _netns.open_netns(policy_netns)
    try:
        with _netlink.Netlink.entered(fd) as nl:
            got = nl.route_get(dst, src=src)
    finally:
        os.close(fd)
    assert (got.table, got.dev) == (100, "lo")
