"""Wire models: parsing every shape, Go-exact dumping, and version round trips (hypothesis)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, strategies as st

from cniplugin.protocol.errors import IncompatibleVersion, InvalidConfig
from cniplugin.protocol.wire import dump_result, negotiate, parse_result

ALL = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
LEGACY = ["0.3.0", "0.3.1", "0.4.0"]

_v4 = st.ip_addresses(v=4)
_v6 = st.ip_addresses(v=6)
_iface = st.one_of(
    st.builds(lambda a, p: f"{a}/{p}", _v4, st.integers(0, 32)),
    st.builds(lambda a, p: f"{a}/{p}", _v6, st.integers(0, 128)))
_text = st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=8)
_interfaces = st.lists(st.fixed_dictionaries(
    {"name": _text.filter(bool)},
    optional={"mac": _text, "mtu": st.integers(0, 9000), "sandbox": _text,
              "socketPath": _text, "pciID": _text}), max_size=3)
_ips = st.lists(st.fixed_dictionaries(
    {"address": _iface},
    optional={"gateway": st.one_of(_v4, _v6).map(str), "interface": st.integers(0, 3)}),
    max_size=4)
_routes = st.lists(st.fixed_dictionaries(
    {"dst": _iface},
    optional={"gw": st.one_of(_v4, _v6).map(str), "mtu": st.integers(0, 9000),
              "advmss": st.integers(0, 9000), "priority": st.integers(0, 100),
              "table": st.integers(0, 300), "scope": st.sampled_from([0, 253, 254])}),
    max_size=4)
_dns = st.fixed_dictionaries({}, optional={
    "nameservers": st.lists(_text, max_size=2), "domain": _text,
    "search": st.lists(_text, max_size=2), "options": st.lists(_text, max_size=2)})
results_11 = st.fixed_dictionaries({}, optional={
    "interfaces": _interfaces, "ips": _ips, "routes": _routes, "dns": _dns})


def _canonical(obj: dict, version: str) -> dict:
    return dump_result(parse_result(obj, version), version)


@given(results_11, st.sampled_from(ALL))
def test_dump_then_parse_is_stable_at_every_version(raw, version):
    once = _canonical(raw, "1.1.0")
    down = dump_result(parse_result(once, "1.1.0"), version)
    assert dump_result(parse_result(down, version), version) == down  # a fixed point
    assert down["cniVersion"] == version


@given(results_11, st.sampled_from(LEGACY))
def test_ips_version_present_exactly_below_1_0_0(raw, version):
    legacy = _canonical(raw, "1.1.0") | {"cniVersion": "1.1.0"}
    down = dump_result(parse_result(legacy, "1.1.0"), version)
    for entry in down.get("ips", []):
        assert entry["version"] == str(ipaddress.ip_interface(entry["address"]).version)
    up = dump_result(parse_result(down, version), "1.0.0")
    assert all("version" not in entry for entry in up.get("ips", []))
    assert "dns" in down  # Go's 040 type always prints dns


@given(results_11)
def test_1_0_0_and_legacy_drop_exactly_the_1_1_fields(raw):
    full = _canonical(raw, "1.1.0")
    for version in ["1.0.0", *LEGACY]:
        down = dump_result(parse_result(full, "1.1.0"), version)
        for intf in down.get("interfaces", []):
            assert not {"mtu", "socketPath", "pciID"} & set(intf)
        for route in down.get("routes", []):
            assert set(route) <= {"dst", "gw"}


@given(results_11)
def test_1_0_0_round_trip_through_legacy_is_lossless(raw):
    """1.0.0 and 0.4.0 carry the same information (minus ips[].version)."""
    v100 = dump_result(parse_result(_canonical(raw, "1.1.0"), "1.1.0"), "1.0.0")
    v040 = dump_result(parse_result(v100, "1.0.0"), "0.4.0")
    back = dump_result(parse_result(v040, "0.4.0"), "1.0.0")
    assert back == v100


def test_go_omits_empty_fields_but_writes_pointer_zeros():
    out = dump_result(parse_result({
        "interfaces": [{"name": "a", "mac": "", "mtu": 0}],
        "ips": [{"address": "10.0.0.1/24", "interface": 0, "gateway": ""}],
        "routes": [{"dst": "0.0.0.0/0", "table": 0, "scope": 0, "mtu": 0}]}, "1.1.0"), "1.1.0")
    assert out == {"cniVersion": "1.1.0", "interfaces": [{"name": "a"}],
                   "ips": [{"interface": 0, "address": "10.0.0.1/24"}],
                   "routes": [{"dst": "0.0.0.0/0", "table": 0, "scope": 0}]}


def test_host_bits_and_ipv6_are_kept_as_written_canonically():
    out = dump_result(parse_result({"ips": [{"address": "FD00:0::5/64"}],
                                    "routes": [{"dst": "10.1.2.3/8"}]}, "1.0.0"), "1.0.0")
    assert out["ips"] == [{"address": "fd00::5/64"}] and out["routes"] == [{"dst": "10.1.2.3/8"}]


@pytest.mark.parametrize("obj, where", [
    ({"ips": [{"address": "10.0.0.1"}]}, "prevResult.ips[0].address"),
    ({"ips": [{"address": "10.0.0.1/24", "gateway": "x"}]}, "prevResult.ips[0].gateway"),
    ({"ips": [{"address": "10.0.0.1/24", "interface": -1}]}, "prevResult.ips[0].interface"),
    ({"routes": [{"gw": "10.0.0.1"}]}, "prevResult.routes[0].dst"),
    ({"interfaces": [{"mac": "x"}]}, "prevResult.interfaces[0].name"),
    ({"interfaces": [{"name": "a", "mtu": "1500"}]}, "prevResult.interfaces[0].mtu"),
    ({"dns": {"nameservers": "1.1.1.1"}}, "prevResult.dns.nameservers"),
])
def test_bad_prev_result_is_code_7_naming_the_field(obj, where):
    with pytest.raises(InvalidConfig) as err:
        parse_result(obj, "1.0.0")
    assert f"key `{where}`" in err.value.msg


def test_prev_result_of_unknown_version_is_code_1():
    with pytest.raises(IncompatibleVersion):
        parse_result({"cniVersion": "2.0.0"}, "1.0.0")


@given(st.lists(st.sampled_from(ALL + ["0.1.0", "0.2.0", "9.9.9", "1.2.0"]), max_size=5),
       st.sampled_from(ALL + ["0.1.0", "9.9.9", None]))
def test_negotiate_picks_the_highest_supported(offered, declared):
    config = {"cniVersions": offered} | ({"cniVersion": declared} if declared else {})
    usable = [v for v in [declared or "0.1.0", *offered] if v in ALL]
    if usable:
        assert negotiate(config) == max(usable, key=lambda v: tuple(map(int, v.split("."))))
    else:
        with pytest.raises(IncompatibleVersion):
            negotiate(config)
