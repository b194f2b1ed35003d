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


def test_opened_if_same_yields_the_recorded_netns_only(policy_netns, tmp_path):
    """The recorded netns while it is still that sandbox; None when the path is empty, gone,
    not a netns, or names another namespace now (and the fd is closed after the body)."""
    from cniplugin.kernel import netns as _netns
    recorded = os.stat(policy_netns).st_ino
    with _netns.opened_if_same(policy_netns, recorded) as fd:
        assert fd is not None and _netns.inode(fd) == recorded
    with pytest.raises(OSError):
        os.fstat(fd)
    (tmp_path / "file").write_text("")
    for path, inode in [("", recorded), (str(tmp_path / "gone"), recorded),
                        (str(tmp_path / "file"), recorded), (policy_netns, recorded + 1)]:
        with _netns.opened_if_same(path, inode) as fd:
            assert fd is None, (path, inode)
