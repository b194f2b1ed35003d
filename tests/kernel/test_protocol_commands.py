"""P4, A1, A7, D2-D4 and the 999 edge: stdin handling and per-command behaviour."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from cniplugin.protocol import dispatch as _protocol
from harness.host import require_root, run_plugin


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    defaults = tmp_path / "defaults.json"
    defaults.write_text(json.dumps({"logDir": str(tmp_path / "log"),
                                    "stateDir": str(tmp_path / "state")}))
    return {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "rtA-c1", "CNI_NETNS": "/run/netns/rtA-x",
            "CNI_IFNAME": "net1", "CNI_PATH": "/usr/lib/cni", "ROUTE_TUNE_DEFAULTS": str(defaults)}


def exact(obj: dict) -> bytes:
    return json.dumps(obj, indent=4).encode()


PREV = {"cniVersion": "1.0.0", "interfaces": [{"name": "net1", "sandbox": "/run/netns/rtA-x"}],
        "ips": [{"interface": 0, "address": "10.9.0.5/24", "gateway": "10.9.0.1"}]}


def conf(**extra) -> dict:
    return {"cniVersion": "1.0.0", "name": "rtA-net", "type": "route-tune", **extra}


# ---------------------------------------------------------------- P4 stdin

@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK"])
@pytest.mark.parametrize("stdin", [b"", b"{", b"nope", b"[1, 2]", b'"x"'])
def test_p4_stdin_not_a_json_object_is_code_6(env, command, stdin):
    proc = run_plugin({**env, "CNI_COMMAND": command}, stdin)
    reply = json.loads(proc.stdout)
    assert proc.returncode == 1
    assert (reply["cniVersion"], reply["code"]) == ("1.1.0", 6)
    assert reply["msg"].startswith("error unmarshalling network config: ")
    assert set(reply) == {"cniVersion", "code", "msg"}


@pytest.mark.parametrize("name, msg, details", [
    (None, "missing network name", ""),
    ("", "missing network name", ""),
    ("bad name", "invalid characters found in network name", "bad name"),
    ("-x", "invalid characters found in network name", "-x"),
    (5, "invalid characters found in network name", "5"),
])
def test_p4_missing_or_invalid_name_is_code_7(env, name, msg, details):
    config = conf(mode="disabled", prevResult=PREV)
    if name is None:
        del config["name"]
    else:
        config["name"] = name
    want = {"cniVersion": "1.0.0", "code": 7, "msg": msg}
    if details:
        want["details"] = details
    assert run_plugin(env, config).stdout == exact(want)


def test_p4_invalid_option_is_code_7_naming_key_and_value(env):
    proc = run_plugin(env, conf(mode="disabled", podRPFilter=7, prevResult=PREV))
    assert proc.stdout == exact({
        "cniVersion": "1.0.0", "code": 7,
        "msg": "key `podRPFilter`: value `7` is not valid; expected less than or equal to 2"})


def test_p4_node_only_key_in_conflist_is_code_7(env):
    proc = run_plugin(env, conf(mode="disabled", logDir="/tmp", prevResult=PREV))
    reply = json.loads(proc.stdout)
    assert reply["code"] == 7 and "`logDir`" in reply["msg"] and "node defaults" in reply["msg"]


def test_p4_log_file_outside_log_dir_is_code_7(env, tmp_path):
    proc = run_plugin(env, conf(mode="disabled", prevResult=PREV,
                                logOptions={"logFile": "/etc/cron.d/evil"}))
    reply = json.loads(proc.stdout)
    assert (reply["code"], proc.returncode) == (7, 1)
    assert "logOptions.logFile" in reply["msg"] and "/etc/cron.d/evil" in reply["msg"]
    assert not Path("/etc/cron.d/evil").exists()


# ---------------------------------------------------------------- A1 / A7

def test_a1_add_without_prev_result_says_route_tune_must_be_chained(env):
    for config in (conf(mode="disabled"), conf()):
        assert run_plugin(env, config).stdout == exact({
            "cniVersion": "1.0.0", "code": 7,
            "msg": "route-tune must be chained: it needs a prevResult",
            "details": "put route-tune last in a conflist's plugins, after an interface plugin "
                       "such as macvlan (with its IPAM)"})


@pytest.mark.parametrize("mode", ["disabled", "disable"])
def test_a7_disabled_mode_passes_prev_result_through(env, mode):
    proc = run_plugin(env, conf(mode=mode, prevResult=PREV))
    assert proc.stdout == exact(PREV) and proc.returncode == 0


@pytest.mark.parametrize("command", ["DEL", "CHECK"])
def test_disabled_mode_del_and_check_succeed_silently(env, command):
    proc = run_plugin({**env, "CNI_COMMAND": command}, conf(mode="disabled", prevResult=PREV))
    assert (proc.returncode, proc.stdout) == (0, b"")


@pytest.mark.parametrize("netns", ["", "/run/netns/rtA-gone-" + uuid.uuid4().hex[:8]])
def test_d3_disabled_del_with_gone_netns_and_no_prev_result(env, netns):
    for _ in range(2):  # D2: and again
        proc = run_plugin({**env, "CNI_COMMAND": "DEL", "CNI_NETNS": netns},
                          conf(mode="disabled"))
        assert (proc.returncode, proc.stdout) == (0, b"")


# ---------------------------------------------------------------- D2-D4 through the engine

@pytest.fixture
def node_ns(make_netns):
    """A throwaway named netns (the 'pod'); the plugin itself runs in a fresh 'node' netns."""
    require_root("ip", "unshare")
    return f"/run/netns/{make_netns('pod')}"


def run_in_fresh_netns(env: dict, config: dict):
    """The engine's node side must never touch the root netns: run the plugin under unshare -n."""
    return run_plugin({"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env}, config, wrap=("unshare", "-n"))


@pytest.mark.netns
@pytest.mark.parametrize("netns", ["", "/run/netns/rtA-gone-" + uuid.uuid4().hex[:8]])
def test_d3_del_with_gone_netns_and_no_prev_result_succeeds_twice(env, netns):
    require_root("unshare")
    for _ in range(2):
        proc = run_in_fresh_netns({**env, "CNI_COMMAND": "DEL", "CNI_NETNS": netns}, conf())
        assert (proc.returncode, proc.stdout) == (0, b""), proc.stderr


@pytest.mark.netns
@pytest.mark.parametrize("with_prev", [False, True])
def test_d4_del_without_prior_add_succeeds_twice(env, node_ns, with_prev):
    config = conf(prevResult={**PREV, "interfaces": [{"name": "net1", "sandbox": node_ns}]}) \
        if with_prev else conf()
    for _ in range(2):  # D2
        proc = run_in_fresh_netns({**env, "CNI_COMMAND": "DEL", "CNI_NETNS": node_ns}, config)
        assert (proc.returncode, proc.stdout) == (0, b""), proc.stderr


# ---------------------------------------------------------------- 999 (in-process)

def test_unexpected_exception_is_999_with_traceback_only_in_the_log(env, monkeypatch, tmp_path,
                                                                    capsys):
    def explode(inv):  # the engine: where a surprise would come from
        raise ZeroDivisionError("boom")

    outcome = _protocol.run(env, json.dumps(conf(prevResult=PREV)).encode(), explode)
    assert outcome.exit_code == 1
    assert outcome.stdout == exact({
        "cniVersion": "1.0.0", "code": 999, "msg": "internal error: ZeroDivisionError: boom",
        "details": "the traceback is in the route-tune log"})
    assert b"Traceback" not in outcome.stdout
    assert "Traceback" not in capsys.readouterr().err  # stderr shows tracebacks only at DEBUG
    lines = [json.loads(line) for line in (tmp_path / "log" / "route-tune.log").read_text()
             .splitlines()]
    assert lines[-1]["level"] == "error" and "ZeroDivisionError: boom" in lines[-1]["error"]
    assert lines[-1]["containerID"] == "rtA-c1" and lines[-1]["command"] == "ADD"


@pytest.mark.parametrize("options", ["x", 3, ["logLevel", "debug"]])
def test_non_object_log_options_is_code_7(env, options):
    proc = run_plugin(env, conf(mode="disabled", logOptions=options, prevResult=PREV))
    reply = json.loads(proc.stdout)
    assert (proc.returncode, reply["code"]) == (1, 7)
    assert reply["msg"].startswith("key `logOptions`: value ")
