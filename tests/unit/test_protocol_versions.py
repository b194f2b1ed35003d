"""P6, V1-V4: VERSION, negotiation, result conversion, command gates (installed executable)."""

from __future__ import annotations

import json

import pytest

from harness.host import run_plugin

ALL = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
SUPPORTED_DETAIL = '"0.3.0" "0.3.1" "0.4.0" "1.0.0" "1.1.0"'


def exact(obj: dict) -> bytes:
    return json.dumps(obj, indent=4).encode()


def prev_result(version: str | None) -> dict:
    """A prevResult in ``version``'s own shape (None: 1.1 shape without a cniVersion key)."""
    legacy = version is not None and version < "1.0.0"
    full = version in (None, "1.1.0")
    interface = {"name": "net1", "mac": "c2:00:00:00:00:01", "sandbox": "/run/netns/rtA-x"}
    route = {"dst": "0.0.0.0/0", "gw": "10.9.0.1"}
    if full:
        interface.update(mtu=1500, socketPath="/run/sock", pciID="0000:00:01.0")
        route.update(mtu=9000, advmss=1400, priority=10, table=100, scope=0)
    ips = [{"interface": 0, "address": "10.9.0.5/24", "gateway": "10.9.0.1"},
           {"interface": 0, "address": "fd00::5/64"}]
    if legacy:
        ips = [{"version": "4", **ips[0]}, {"version": "6", **ips[1]}]
    result = {"interfaces": [interface, {"name": "macvlan-host"}], "ips": ips,
              "routes": [route, {"dst": "fd00:1::/64", "gw": "fd00::1"}],
              "dns": {"nameservers": ["10.9.0.1"], "search": ["svc.local"]}}
    return result if version is None else {"cniVersion": version, **result}


def expected_output(version: str) -> dict:
    """What route-tune must print for ``prev_result(<any>)`` at config ``version``."""
    legacy, full = version < "1.0.0", version == "1.1.0"
    interface = {"name": "net1", "mac": "c2:00:00:00:00:01"}
    if full:
        interface["mtu"] = 1500
    interface["sandbox"] = "/run/netns/rtA-x"
    if full:
        interface.update(socketPath="/run/sock", pciID="0000:00:01.0")
    ips = [{"interface": 0, "address": "10.9.0.5/24", "gateway": "10.9.0.1"},
           {"interface": 0, "address": "fd00::5/64"}]
    if legacy:
        ips = [{"version": "4", **ips[0]}, {"version": "6", **ips[1]}]
    route = {"dst": "0.0.0.0/0", "gw": "10.9.0.1"}
    if full:
        route.update(mtu=9000, advmss=1400, priority=10, table=100, scope=0)
    return {"cniVersion": version, "interfaces": [interface, {"name": "macvlan-host"}],
            "ips": ips, "routes": [route, {"dst": "fd00:1::/64", "gw": "fd00::1"}],
            "dns": {"nameservers": ["10.9.0.1"], "search": ["svc.local"]}}


def config(version: str | None, **extra) -> dict:
    conf = {"name": "rtA-net", "type": "route-tune", "mode": "disabled", **extra}
    if version is not None:
        conf["cniVersion"] = version
    return conf


# ---------------------------------------------------------------- P6 VERSION

VERSION_REPLY = b'{"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}\n'


@pytest.mark.parametrize("stdin", [b"", b'{"cniVersion":"0.4.0"}', b"not json at all"])
def test_p6_version_never_reads_stdin(stdin):
    proc = run_plugin({"CNI_COMMAND": "VERSION"}, stdin)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, VERSION_REPLY, b"")


def test_p6_version_ignores_libcni_probe_dummies():
    proc = run_plugin({"CNI_COMMAND": "VERSION", "CNI_NETNS": "dummy", "CNI_IFNAME": "dummy",
                       "CNI_PATH": "dummy"}, b"")
    assert (proc.returncode, proc.stdout) == (0, VERSION_REPLY)


# ---------------------------------------------------------------- V1/V2 result conversion

@pytest.mark.parametrize("version", ALL)
def test_v1_add_prints_prev_result_in_the_config_version(cni_env, version):
    proc = run_plugin(cni_env, config(version, prevResult=prev_result(version)))
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout == exact(expected_output(version))


@pytest.mark.parametrize("out_version", ALL)
@pytest.mark.parametrize("in_version", ALL)
def test_v1_prev_result_of_another_version_is_converted(cni_env, in_version, out_version):
    proc = run_plugin(cni_env, config(out_version, prevResult=prev_result(in_version)))
    if in_version < "1.1.0":  # the 1.1-only fields were never there
        want = expected_output(min(out_version, "1.0.0"))
        want["cniVersion"] = out_version
    else:
        want = expected_output(out_version)
    assert proc.stdout == exact(want)


@pytest.mark.parametrize("version", ALL)
def test_v2_prev_result_without_cni_version_takes_the_config_version(cni_env, version):
    raw = prev_result(version)
    del raw["cniVersion"]
    proc = run_plugin(cni_env, config(version, prevResult=raw))
    assert proc.stdout == exact(expected_output(version))


def test_v2_1_0_0_prev_result_still_carrying_ips_version_is_accepted(cni_env):
    raw = prev_result("0.4.0")
    raw["cniVersion"] = "1.0.0"
    proc = run_plugin(cni_env, config("1.0.0", prevResult=raw))
    assert proc.stdout == exact(expected_output("1.0.0"))


def test_v2_empty_dns_is_dropped_from_1x_and_kept_below(cni_env):
    prev = {"ips": [{"address": "10.9.0.5/24"}]}
    for version, want in (("1.0.0", {"cniVersion": "1.0.0", "ips": [{"address": "10.9.0.5/24"}]}),
                          ("0.4.0", {"cniVersion": "0.4.0", "ips": [
                              {"version": "4", "address": "10.9.0.5/24"}], "dns": {}})):
        assert run_plugin(cni_env, config(version, prevResult=prev)).stdout == exact(want)


def test_v2_0_2_0_prev_result_is_converted_like_go(cni_env):
    prev = {"cniVersion": "0.2.0", "ip4": {"ip": "10.9.0.5/24", "gateway": "10.9.0.1",
                                           "routes": [{"dst": "0.0.0.0/0"}]}}
    proc = run_plugin(cni_env, config("1.0.0", prevResult=prev))
    assert proc.stdout == exact({"cniVersion": "1.0.0", "ips": [
        {"address": "10.9.0.5/24", "gateway": "10.9.0.1"}], "routes": [{"dst": "0.0.0.0/0"}]})


def test_v2_unknown_prev_result_version_is_code_1(cni_env):
    proc = run_plugin(cni_env, config("1.0.0", prevResult={"cniVersion": "9.9.9"}))
    assert proc.stdout == exact({"cniVersion": "1.0.0", "code": 1,
                                 "msg": "unsupported prevResult version",
                                 "details": 'prevResult is "9.9.9"'})


# ---------------------------------------------------------------- V3 negotiation

@pytest.mark.parametrize("declared", ["0.2.0", "0.1.0", None, "", "9.9.9", "1.0"])
def test_v3_unsupported_config_version_is_code_1(cni_env, declared):
    proc = run_plugin(cni_env, config(declared, prevResult={}))
    shown = declared or "0.1.0"
    assert proc.returncode == 1
    assert proc.stdout == exact({"cniVersion": "1.1.0", "code": 1,
                                 "msg": "incompatible CNI versions",
                                 "details": f'config is "{shown}", plugin supports '
                                            f'[{SUPPORTED_DETAIL}]'})


@pytest.mark.parametrize("declared, msg", [("abc", 'invalid version "abc"'),
                                           ("1.0.0.0", 'invalid version "1.0.0.0"'),
                                           (1.0, "invalid version 1.0")])
def test_v3_malformed_version_is_code_6(cni_env, declared, msg):
    proc = run_plugin(cni_env, config(None, cniVersion=declared, prevResult={}))
    assert proc.stdout == exact({"cniVersion": "1.1.0", "code": 6, "msg": msg})


@pytest.mark.parametrize("declared, offered, chosen", [
    ("1.0.0", ["1.0.0", "1.1.0"], "1.1.0"),
    ("9.9.9", ["0.4.0", "2.0.0"], "0.4.0"),
    (None, ["0.3.1", "1.0.0"], "1.0.0"),
    ("1.1.0", ["0.4.0"], "1.1.0"),
])
def test_v3_cni_versions_list_picks_the_highest_common_version(cni_env, declared, offered, chosen):
    proc = run_plugin(cni_env, config(declared, cniVersions=offered, prevResult={}))
    want = {"cniVersion": chosen}
    if chosen < "1.0.0":
        want["dns"] = {}
    assert proc.stdout == exact(want)


def test_v3_cni_versions_with_nothing_supported_is_code_1(cni_env):
    proc = run_plugin(cni_env, config(None, cniVersions=["2.0.0"], prevResult={}))
    assert json.loads(proc.stdout)["code"] == 1
    assert json.loads(proc.stdout)["details"].startswith('config is "0.1.0"')


# ---------------------------------------------------------------- V4 command gates

@pytest.mark.parametrize("version", ["0.3.0", "0.3.1"])
def test_v4_check_below_0_4_0_is_code_1(cni_env, version):
    proc = run_plugin({**cni_env, "CNI_COMMAND": "CHECK"}, config(version, prevResult={}))
    assert proc.stdout == exact({"cniVersion": version, "code": 1,
                                 "msg": "config version does not allow CHECK",
                                 "details": f'config is "{version}", CHECK needs 0.4.0 or later'})


@pytest.mark.parametrize("command", ["GC", "STATUS"])
@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0"])
def test_v4_gc_and_status_below_1_1_0_are_code_1(cni_env, command, version):
    proc = run_plugin({"CNI_COMMAND": command, "CNI_PATH": "/usr/lib/cni",
                       "ROUTE_TUNE_DEFAULTS": cni_env["ROUTE_TUNE_DEFAULTS"]}, config(version))
    assert proc.stdout == exact({
        "cniVersion": version, "code": 1, "msg": f"config version does not allow {command}",
        "details": f'config is "{version}", {command} needs 1.1.0 or later'})


@pytest.mark.parametrize("command", ["GC", "STATUS"])
def test_v4_gc_and_status_at_1_1_0_succeed_silently(cni_env, command):
    gc_keys = {"cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "net1"}],
               "cni.dev/attachments": [{"containerID": "c1", "ifname": "net1"}]}
    proc = run_plugin({"CNI_COMMAND": command, "CNI_PATH": "/usr/lib/cni",
                       "ROUTE_TUNE_DEFAULTS": cni_env["ROUTE_TUNE_DEFAULTS"]},
                      config("1.1.0", **gc_keys))
    assert (proc.returncode, proc.stdout) == (0, b"")


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_v4_check_from_0_4_0_passes_in_disabled_mode(cni_env, version):
    proc = run_plugin({**cni_env, "CNI_COMMAND": "CHECK"},
                      config(version, prevResult=prev_result(version)))
    assert (proc.returncode, proc.stdout) == (0, b"")
