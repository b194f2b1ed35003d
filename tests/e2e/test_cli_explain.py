"""``cni-route-tune explain`` on policy routing route-tune never writes: goto, not, fwmark,
iif lo, suppress_prefixlength, unreachable/prohibit rules, throw/blackhole/prohibit/unreachable
routes, metrics and multipath. Every answer must agree with the kernel's own lookup.
"""

from __future__ import annotations

import errno
import os

import pytest

from cniplugin.cli import explain as _explain
from cniplugin.records.facts import Addr
from cniplugin.cli.live import LiveRoute, LiveRule, Snapshot
from cniplugin.kernel.reads import RouteGet
from cniplugin.cli.render import explain_text
from harness.cli import cli
from harness.lab import VETH_PAIR, scratch_netns

SETUP = [*VETH_PAIR, *"""\
addr add fd09::1/64 dev va nodad
route add default via 10.9.0.254 dev va
route add 203.0.113.0/24 via 10.8.0.254 table 200
route add throw 203.0.113.128/25 table 200
route add blackhole 198.51.100.0/24 table 201
route add prohibit 198.51.100.64/26 table 201
route add default via 10.8.0.254 table 202
route add unreachable 192.0.2.0/24 table 203
route add 192.0.2.0/24 via 10.9.0.254 table 204 metric 5
route add 192.0.2.0/24 via 10.8.0.254 table 204 metric 3
route add 100.64.0.0/10 table 205 nexthop via 10.9.0.254 dev va nexthop via 10.8.0.254 dev vb
route add 2001:db8:5::/48 via fd09::fe dev va table 206
rule add pref 100 fwmark 0x10/0xff lookup 202
rule add pref 110 iif lo to 203.0.113.0/24 lookup 200
rule add pref 120 to 198.51.100.0/24 lookup 201
rule add pref 130 not from 10.9.0.0/16 to 192.0.2.0/24 goto 150
rule add pref 140 to 192.0.2.0/24 lookup 203
rule add pref 150 to 192.0.2.0/24 lookup 204
rule add pref 160 to 100.64.0.0/10 lookup 205
rule add pref 170 lookup main suppress_prefixlength 0
rule add pref 180 to 233.252.0.0/24 unreachable
rule add pref 190 to 233.252.1.0/24 prohibit
rule add pref 200 ipproto tcp lookup 202
rule add pref 210 to 10.7.0.0/16 goto 999
rule add pref 220 iif vb lookup 202
""".splitlines()]
SETUP6 = """\
rule add pref 100 to 2001:db8:5::/48 lookup 206
rule add pref 110 from fd09::1 to 2001:db8:6::/48 prohibit
"""

# (dst, extra args, expected walk table or None, expected dev or errno)
CASES = [
    ("203.0.113.5", [], 200, "vb"),                       # iif lo + to
    ("203.0.113.200", [], 254, "va"),                     # throw -> suppressed default -> main
    ("198.51.100.5", [], 201, errno.EINVAL),              # blackhole route
    ("198.51.100.70", [], 201, errno.EACCES),             # prohibit route (longer prefix)
    ("192.0.2.9", ["--from", "10.9.0.1"], 203, errno.EHOSTUNREACH),   # unreachable route
    ("192.0.2.9", ["--from", "10.8.0.1"], 204, "vb"),     # not ... goto 150, lowest metric
    ("100.64.1.1", [], 205, ("va", "vb")),                # multipath
    ("8.8.8.8", [], 254, "va"),
    ("8.8.8.8", ["--mark", "0x110"], 202, "vb"),          # fwmark with mask
    ("233.252.0.9", [], None, errno.ENETUNREACH),         # unreachable rule
    ("233.252.1.9", [], None, errno.EACCES),              # prohibit rule
    ("10.7.1.1", [], 254, "va"),                          # unresolved goto is skipped
    ("10.9.0.1", ["--from", "10.8.0.99", "--iif", "vb"], 255, "lo"),  # input, local
    ("192.0.2.1", ["--from", "1.2.3.4"], None, errno.ENETUNREACH),     # non-local source
    ("2001:db8:5::1", [], 206, "va"),
    ("2001:db8:6::1", ["--from", "fd09::1"], None, errno.EACCES),
    ("2001:db8:6::1", [], None, errno.ENETUNREACH),     # no IPv6 default anywhere
]


@pytest.fixture(scope="module")
def netns(lab_session):
    with scratch_netns("explain", SETUP, SETUP6.splitlines()) as name:
        yield name


def _explain_json(ns: str, dst: str, extra: list[str]) -> tuple[int, dict]:
    run = cli("explain", dst, *extra, "--netns", ns, "--json")
    assert run.code in (0, 1), run.err
    return run.code, run.json()


@pytest.mark.netns
@pytest.mark.parametrize("dst,extra,table,dev", CASES,
                         ids=[f"{c[0]} {' '.join(c[1])}".strip() for c in CASES])
def test_walk_agrees_with_the_kernel(netns, dst, extra, table, dev):
    code, data = _explain_json(netns, dst, extra)
    assert data["agree"], data["disagreement"]
    assert code == 0
    walk = data["walk"]
    assert walk["table"] == table
    if isinstance(dev, int):
        assert walk["error"] == os.strerror(dev)
        assert os.strerror(dev) in data["kernel"]["error"]
    elif isinstance(dev, tuple):
        assert tuple(walk["devs"]) == dev and data["kernel"]["dev"] in dev
    else:
        assert walk["dev"] == dev == data["kernel"]["dev"]


@pytest.mark.netns
def test_walk_text_explains_goto_and_not(netns):
    run = cli("explain", "192.0.2.9", "--from", "10.8.0.1", "--netns", netns)
    assert run.code == 0, run.err
    out = run.out
    assert "  -> 130: not from 10.9.0.0/16 to 192.0.2.0/24 goto 150" in out
    assert "selectors fail (from 10.9.0.0/16 ≠ 10.8.0.1), so `not` matches" in out
    assert "     140: from all to 192.0.2.0/24 lookup 203" not in out  # jumped over
    assert "table 204: 192.0.2.0/24 via 10.8.0.254 dev vb metric 3" in out


def test_disagreement_is_loud():
    """A walk that misses something must say so, not print a confident wrong answer."""
    rule = LiveRule(4, 100, "lookup", table=101, src="10.0.0.1/32", proto=231)
    route = LiveRoute(4, 101, "unicast", "0.0.0.0/0", dev="net1", gateway="10.0.0.254")
    snap = Snapshot(inode=1, links=[], addrs=[Addr("net1", 4, "10.0.0.1", 24)], rules=[rule],
                    routes=[route], neighbours=[])
    out = _explain.walk(snap, _explain.Flow(4, "192.0.2.1", "10.0.0.1"))
    out.kernel = RouteGet(table=254, dev="eth0", gateway="169.254.1.1")
    _explain._compare(out)
    assert not out.agree
    text = explain_text("/run/netns/x", out)
    assert "!!! DISAGREEMENT: the kernel chose table main (walk: 101), dev eth0 (walk: net1)" \
        in text


def test_iif_unknown_is_a_usage_error(netns):
    run = cli("explain", "10.9.0.1", "--iif", "nope0", "--netns", netns)
    assert run.code == 2 and "nope0" in run.err
