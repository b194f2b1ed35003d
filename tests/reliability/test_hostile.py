"""Hostile and malformed input (issue 8): env vars, config keys and prevResult shapes.

Every case is one ADD (or CHECK) of the installed ``route-tune`` inside a lab's node netns, with a
pod whose net1 is really attached (macvlan + host-local), so the request would succeed but for the
one hostile value. Each must end in ONE well-formed CNI error JSON on stdout with the right code,
exit 1, and the pod, the node (whole state, nft included) and the state dir exactly as before.

- ``test_named_case``: the cases issue 8 names (tables 0/253/254/255, logFile path tricks, node-only
  keys, prevResult claiming the node's IP or gateway, wrong types, huge values, unicode, ...).
- ``test_hypothesis_sweep``: generated cases, 20 per engine mode always; 400 with ``--run-slow``.
Both engine modes (in-process and resident) share one lab per mode.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.fixtures import ENGINES
from harness.lab import NAMES
from harness.plugin import Reply, Rig, assert_cni_error
from harness.snapshot import snapshot_diff

pytestmark = [pytest.mark.netns]

DROP = object()  # a key value meaning "remove this key"


@dataclass
class Case:
    """One hostile request: overrides of the otherwise valid ADD of net1, and the expected code."""

    name: str
    code: int
    env: dict = field(default_factory=dict)
    keys: dict = field(default_factory=dict)
    prev: Callable[[dict], Any] | None = None   # prevResult -> hostile prevResult
    stdin: bytes | None = None                  # replaces the whole stdin
    command: str = "ADD"
    xfail: dict = field(default_factory=dict)   # engine mode -> known defect (strict xfail)

    def __repr__(self) -> str:
        return f"Case({self.name}: env={self.env!r} keys={self.keys!r} stdin={self.stdin!r:.80} -> {self.code})"


def with_ip(address: str, gateway: str | None = None) -> Callable[[dict], dict]:
    """prevResult whose only IP (for net1) is ``address``."""
    def edit(prev: dict) -> dict:
        entry = {"address": address, "interface": 0, **({"gateway": gateway} if gateway else {})}
        return {**prev, "ips": [entry]}
    return edit


def replace(path: tuple, value: Any) -> Callable[[dict], Any]:
    """prevResult with the value at ``path`` replaced (``()`` replaces the whole prevResult)."""
    def edit(prev: dict) -> Any:
        if not path:
            return value
        out = json.loads(json.dumps(prev))
        node = out
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
        return out
    return edit


# ---------------------------------------------------------------------------- the named cases

def _named() -> list:
    cases = [
        # environment (code 4 before stdin is even parsed; 3 for a netns that is not one)
        Case("command lower case", 4, env={"CNI_COMMAND": "add"}),
        Case("command unknown", 4, env={"CNI_COMMAND": "ADD\u200b"}),
        Case("no container id", 4, env={"CNI_CONTAINERID": ""}),
        Case("container id path", 4, env={"CNI_CONTAINERID": "../../etc"}),
        Case("container id unicode", 4, env={"CNI_CONTAINERID": "pod\u00e9"}),
        Case("ifname path", 4, env={"CNI_IFNAME": "../../x"}),
        Case("ifname too long", 4, env={"CNI_IFNAME": "n" * 16}),
        Case("ifname dotdot", 4, env={"CNI_IFNAME": ".."}),
        Case("ifname colon", 4, env={"CNI_IFNAME": "net1:0"}),
        Case("ifname unicode absent", 102, env={"CNI_IFNAME": "n\u00e9t1"}),
        Case("no CNI_PATH", 4, env={"CNI_PATH": ""}),
        Case("netns missing", 3, env={"CNI_NETNS": "/run/netns/rtR-never-created"}),
        Case("netns regular file", 3, env={"CNI_NETNS": "/etc/hostname"}),
        Case("netns directory", 3, env={"CNI_NETNS": "/tmp"}),
        Case("netns a mount namespace", 3, env={"CNI_NETNS": "/proc/self/ns/mnt"}),
        Case("netns path too long", 3, env={"CNI_NETNS": "/" + "n" * 5000}),
        Case("netns path a symlink loop", 3, env={"CNI_NETNS": lambda t: str(t.loop)}),
        Case("defaults is a directory", 7, env={"ROUTE_TUNE_DEFAULTS": "/tmp"}),
        # stdin
        Case("stdin empty", 6, stdin=b""),
        Case("stdin not json", 6, stdin=b"{\"cniVersion\": "),
        Case("stdin binary", 6, stdin=b"\xff\xfe\x00garbage"),
        Case("stdin a list", 6, stdin=b"[1, 2]"),
        Case("no name", 7, keys={"name": DROP}),
        Case("name unicode", 7, keys={"name": "r\u00e4il"}),
        Case("name path", 7, keys={"name": "../rail1"}),
        Case("version unsupported", 1, keys={"cniVersion": "9.9.9"}),
        Case("version malformed", 6, keys={"cniVersion": "1.x"}),
        Case("cniVersions not a list", 6, keys={"cniVersions": "1.0.0"}),
        # tables that belong to the node, and hostRuleTable colliding with them
        *[Case(f"hostRuleTable {t}", 7, keys={"hostRuleTable": t}) for t in (0, 253, 254, 255)],
        Case("hostRuleTable negative", 7, keys={"hostRuleTable": -1}),
        Case("hostRuleTable 2^32", 7, keys={"hostRuleTable": 2**32}),
        Case("hostRuleTable huge", 7, keys={"hostRuleTable": 10**40}),
        Case("hostRuleTable string", 7, keys={"hostRuleTable": "500"}),
        Case("hostRuleTable bool", 7, keys={"hostRuleTable": True}),
        Case("hostRuleTable float", 7, keys={"hostRuleTable": 500.5}),
        # node-only keys and path tricks
        *[Case(f"node-only {k}", 7, keys={k: v}) for k, v in (
            ("stateDir", "/tmp/rtR-x"), ("logDir", "/etc"), ("hostRulePriority", 1),
            ("socketPath", "/tmp/rtR-x.sock"), ("allowedHostRuleTables", [254]))],
        Case("logFile escapes", 7, keys={"logOptions": {"logFile": "../../etc/x"}}),
        Case("logFile absolute", 7, keys={"logOptions": {"logFile": "/etc/rtR-x"}}),
        Case("logFile is logDir", 7, keys={"logOptions": {"logFile": "."}}),
        Case("logFile NUL", 7, keys={"logOptions": {"logFile": "a\u0000b"}}),
        Case("logLevel unknown", 7, keys={"logOptions": {"logLevel": "l\u00f6ud"}}),
        Case("logMaxSize negative", 7, keys={"logOptions": {"logMaxSize": -1}}),
        # wrong types, huge values, unicode
        Case("mode unicode", 7, keys={"mode": "\u00fcnderlay"}),
        Case("mode huge", 7, keys={"mode": "x" * 200_000}),
        Case("tunePodRoutes string", 7, keys={"tunePodRoutes": "true"}),
        Case("podRPFilter 3", 7, keys={"podRPFilter": 3}),
        Case("txQueueLen huge", 7, keys={"txQueueLen": 10**30}),
        Case("vethMTU zero", 7, keys={"vethMTU": 0}),
        Case("podMACPrefix multicast", 7, keys={"podMACPrefix": "01:00"}),
        Case("podDefaultCniNic too long", 7, keys={"podDefaultCniNic": "e" * 16}),
        Case("podDefaultCniNic not a veth", 102, keys={"podDefaultCniNic": "lo"}),
        Case("podDefaultRouteNic lo", 7, keys={"podDefaultRouteNic": "lo"}),
        Case("serviceCIDR /0", 7, keys={"serviceCIDR": ["0.0.0.0/0"]}),
        Case("serviceCIDR not a list", 7, keys={"serviceCIDR": "10.96.0.0/12"}),
        Case("overlayPodCIDR garbage", 7, keys={"overlayPodCIDR": ["10.0.0.0/33"]}),
        Case("policyRoutes mixed family", 7, keys={"policyRoutes": [{"dst": "10.0.0.0/8", "gw": "fd00::1"}]}),
        Case("detectOptions retries 0", 7, keys={"detectOptions": {"retries": 0}}),
        Case("detectOptions timeout garbage", 7, keys={"detectOptions": {"timeout": "soon"}}),
        Case("detectOptions a string", 7, keys={"detectOptions": "fast"}),
        # prevResult shapes
        Case("no prevResult", 7, keys={"prevResult": DROP}),
        Case("prevResult a string", 7, prev=replace((), "x")),
        Case("prevResult a list", 7, prev=replace((), [])),
        Case("ips not a list", 7, prev=replace(("ips",), {"address": "172.16.11.10/24"})),
        Case("address without prefix", 7, prev=with_ip("172.16.11.10")),
        Case("address garbage", 7, prev=with_ip("172.16.11.300/24")),
        Case("interface index negative", 7, prev=replace(("ips", 0, "interface"), -1)),
        Case("interfaces wrong type", 7, prev=replace(("interfaces",), "net1")),
        Case("prevResult version unsupported", 1, prev=replace(("cniVersion",), "9.9.9")),
        # prevResult claiming what belongs to the node
        Case("claims the node IP", 107, prev=with_ip("10.1.20.4/24")),
        Case("claims the node IPv6", 107, prev=with_ip("fd00:10:1:20::4/64")),
        Case("claims the node gateway", 107, prev=with_ip("10.1.20.1/24")),
        Case("claims node loopback", 107, prev=with_ip("127.0.0.1/8")),
        Case("CHECK with node-only key", 7, keys={"stateDir": "/tmp/rtR-x"}, command="CHECK"),
    ]
    # Addresses that are not unicast addresses of net1, or a gateway of the other family.
    cases += [Case("address unspecified 0.0.0.0/0", 7, prev=with_ip("0.0.0.0/0")),
              Case("address multicast", 7, prev=with_ip("224.0.0.5/24")),
              Case("address broadcast", 7, prev=with_ip("255.255.255.255/32")),
              Case("address is eth0's, not net1's", 7, prev=with_ip("10.233.119.164/24")),
              Case("address not on net1", 7, prev=with_ip("172.16.99.10/24")),
              Case("gateway of the other family", 7, prev=with_ip("172.16.11.10/24", "fd00:16:11::254"))]
    params = [pytest.param(c, id=c.name) for c in cases]  # per-engine xfails: see test_named_case
    return params


# ---------------------------------------------------------------------------- the shared lab

@dataclass
class Target:
    rig: Rig
    prev: dict
    baseline: dict
    loop: object = None  # a symlink pointing at itself

    def __repr__(self) -> str:  # hypothesis prints arguments of failing examples
        return f"Target({self.rig.lab.prefix}, {self.rig.engine})"


@pytest.fixture(scope="module", params=ENGINES)
def target(request, lab_session):
    """One dual-stack lab per engine mode with net1 attached (macvlan + host-local), no route-tune."""
    from cniplugin.lab.topology import OverlayLab

    lab = OverlayLab(NAMES.next(), rails=1, family="dual").__enter__()
    rig = Rig(lab, request.param)
    try:
        prev = rig.bare().add(1)
        loop = lab.tmp / "netns-loop"
        loop.symlink_to(loop)
        yield Target(rig, prev, rig.snapshot(), loop)
    finally:
        rig.close()


def attempt(t: Target, case: Case) -> Reply:
    """Run ``case``; if it wrongly succeeded, DEL it at once so later cases see a clean lab."""
    rig = t.rig
    conf = rig.conf(1)
    conf["prevResult"] = case.prev(t.prev) if case.prev else t.prev
    for key, value in case.keys.items():
        if value is DROP:
            conf.pop(key, None)
        else:
            conf[key] = value
    extra = {k: (v(t) if callable(v) else v) for k, v in case.env.items()}
    env = rig.env(case.command, "net1", extra=extra)
    reply = rig.exec_plugin(env, case.stdin if case.stdin is not None else conf)
    if reply.code == 0 and case.command == "ADD":
        rig.exec_plugin(rig.env("DEL", env["CNI_IFNAME"], extra=extra), conf)
    return reply


def check(t: Target, case: Case) -> None:
    reply = attempt(t, case)
    assert_cni_error(reply, case.code)
    diff = snapshot_diff(t.baseline, t.rig.snapshot())
    assert diff == "", f"{case!r} changed the pod or node:\n{diff}"


@pytest.mark.parametrize("case", _named())
def test_named_case(target, case, request):
    """One named hostile input: one error JSON with the right code, exit 1, nothing changed."""
    if target.rig.engine in case.xfail:
        request.applymarker(pytest.mark.xfail(strict=True, reason=case.xfail[target.rig.engine]))
    check(target, case)


def test_del_with_a_non_network_netns_succeeds(target, request):
    """DEL whose CNI_NETNS names a namespace file of another type (the shim's own mount
    namespace) must succeed like a DEL whose netns is gone: the runtime would retry a failing
    DEL forever."""
    conf = {**target.rig.conf(1), "prevResult": target.prev}
    reply = target.rig.exec_plugin(target.rig.env("DEL", "net1", netns="/proc/self/ns/mnt"), conf)
    assert (reply.code, reply.stdout) == (0, b""), str(reply)
    assert snapshot_diff(target.baseline, target.rig.snapshot()) == ""


# ---------------------------------------------------------------------------- the sweep

_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
_CONTAINER_ID_OK = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*\Z")
_IFNAME_CHARS = re.compile(r"[/:\s]")
_NOT_INT = st.one_of(_TEXT, st.floats(allow_nan=False), st.booleans(), st.none(),
                     st.lists(st.integers(), max_size=3), st.dictionaries(_TEXT, st.integers(), max_size=2))
_NOT_BOOL = st.one_of(_TEXT, st.integers(), st.floats(allow_nan=False), st.none(), st.lists(st.booleans(), max_size=2))
_HUGE = st.one_of(st.integers(min_value=2**32), st.integers(max_value=-2))


def _bad_ifname() -> st.SearchStrategy[str]:
    too_long = _TEXT.filter(lambda s: len(s.encode()) > 15)
    forbidden = st.tuples(_TEXT, st.sampled_from("/: \t\n"), _TEXT).map("".join)
    return st.one_of(too_long, forbidden, st.sampled_from(["", ".", ".."]))


def env_cases() -> st.SearchStrategy[Case]:
    ifname = _bad_ifname().map(lambda v: Case("CNI_IFNAME", 4, env={"CNI_IFNAME": v}))
    cid = _TEXT.filter(lambda s: not _CONTAINER_ID_OK.match(s)).map(
        lambda v: Case("CNI_CONTAINERID", 4, env={"CNI_CONTAINERID": v}))
    command = _TEXT.filter(lambda s: s not in ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS", "")).map(
        lambda v: Case("CNI_COMMAND", 4, env={"CNI_COMMAND": v}))
    netns = st.sampled_from(["/", "/dev/null", "/run/netns/rtR-no-such", "/etc/hostname"]).map(
        lambda v: Case("CNI_NETNS", 3, env={"CNI_NETNS": v}))
    absent = _TEXT.filter(lambda s: s and not _IFNAME_CHARS.search(s) and len(s.encode()) <= 15
                          and s not in (".", "..", "lo", "eth0", "net1")).map(
        lambda v: Case("absent CNI_IFNAME", 102, env={"CNI_IFNAME": v}))
    return st.one_of(ifname, cid, command, netns, absent)


#: key -> strategy of values that are invalid for it (all code 7).
_BAD_VALUES: dict[str, st.SearchStrategy] = {
    "hostRuleTable": st.one_of(st.sampled_from([0, 253, 254, 255]), _HUGE, _NOT_INT),
    "podRPFilter": st.one_of(st.integers(min_value=3), st.integers(max_value=-2), _NOT_INT),
    "txQueueLen": st.one_of(_HUGE, _NOT_INT),
    "vethMTU": st.one_of(st.integers(max_value=0), st.integers(min_value=65536), _NOT_INT),
    "mode": _TEXT.filter(lambda s: s not in ("auto", "overlay", "underlay", "disabled", "disable")),
    "tunePodRoutes": _NOT_BOOL,
    "detectGateway": _NOT_BOOL,
    "detectIPConflict": _NOT_BOOL,
    "podDefaultCniNic": st.one_of(_bad_ifname().filter(bool), st.integers(), st.lists(_TEXT, max_size=2)),
    "serviceCIDR": st.one_of(_TEXT, st.integers(), st.lists(st.one_of(st.integers(), st.just("0.0.0.0/0"),
                                                                     st.just("::/0")), min_size=1, max_size=3)),
    "overlayPodCIDR": st.lists(_TEXT.filter(lambda s: not re.fullmatch(r"[0-9a-fA-F.:/]+", s)),
                               min_size=1, max_size=3),
    "hijackCIDR": st.one_of(st.dictionaries(_TEXT, _TEXT, min_size=1, max_size=2), st.booleans()),
    "policyRoutes": st.one_of(_TEXT.filter(bool), st.lists(st.fixed_dictionaries({"dst": _TEXT}), min_size=1, max_size=2)),
    "podMACPrefix": _TEXT.filter(lambda s: s and not re.fullmatch(r"[0-9a-fA-F]{2}[:-][0-9a-fA-F]{2}", s)),
    "detectOptions": st.one_of(st.fixed_dictionaries({"retries": st.one_of(st.integers(max_value=0), _TEXT)}),
                               st.fixed_dictionaries({"timeout": _TEXT.filter(lambda s: not re.fullmatch(r"[0-9.]*[a-z\u00b5\u03bc]*", s))})),
    "logOptions": st.one_of(
        st.fixed_dictionaries({"logFile": st.tuples(st.integers(1, 6), _TEXT).map(lambda t: "../" * t[0] + t[1])}),
        st.fixed_dictionaries({"logFile": _TEXT.map(lambda s: "/etc/" + s)}),
        st.fixed_dictionaries({"logLevel": _TEXT.filter(lambda s: s.lower() not in (
            "debug", "info", "warn", "warning", "error", "dpanic", "panic", "fatal"))}),
        st.fixed_dictionaries({"logMaxCount": st.one_of(st.integers(max_value=-1), _TEXT)})),
    "stateDir": _TEXT, "logDir": _TEXT, "socketPath": _TEXT, "hostRulePriority": st.integers(),
}


def config_cases() -> st.SearchStrategy[Case]:
    return st.sampled_from(sorted(_BAD_VALUES)).flatmap(
        lambda key: _BAD_VALUES[key].map(lambda v: Case(f"key {key}", 7, keys={key: v})))


def prev_cases() -> st.SearchStrategy[Case]:
    not_object = st.one_of(_TEXT, st.integers(), st.lists(st.integers(), max_size=2), st.booleans()).map(
        lambda v: Case("prevResult not an object", 7, prev=replace((), v)))
    ips = st.one_of(_TEXT, st.integers(), st.dictionaries(_TEXT, _TEXT, max_size=2)).map(
        lambda v: Case("prevResult.ips", 7, prev=replace(("ips",), v)))
    address = st.one_of(_TEXT.filter(lambda s: "/" not in s), st.integers(), st.none()).map(
        lambda v: Case("ips[0].address", 7, prev=replace(("ips", 0, "address"), v)))
    interface = st.one_of(st.integers(max_value=-1), _TEXT, st.floats(allow_nan=False)).map(
        lambda v: Case("ips[0].interface", 7, prev=replace(("ips", 0, "interface"), v)))
    node_owned = st.sampled_from(["10.1.20.4/24", "10.1.20.4/32", "10.1.20.1/24", "127.0.0.1/8",
                                  "fd00:10:1:20::4/64", "::1/128"]).map(
        lambda v: Case("claims a node address", 107, prev=with_ip(v)))
    return st.one_of(not_object, ips, address, interface, node_owned)


SWEEP = st.one_of(env_cases(), config_cases(), prev_cases())


def _sweep_settings(examples: int, **kw) -> settings:
    return settings(max_examples=examples, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large], **kw)


@_sweep_settings(20, derandomize=True)
@given(case=SWEEP)
def test_hypothesis_sweep(target, case):
    """Generated hostile inputs (20 per mode, deterministic): one error JSON, right code, no change."""
    check(target, case)


@pytest.mark.slow
@_sweep_settings(400)
@given(case=SWEEP)
def test_hypothesis_sweep_long(target, case):
    """The same sweep, 400 random examples per mode (``--run-slow``)."""
    check(target, case)
