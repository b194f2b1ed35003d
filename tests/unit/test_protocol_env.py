"""P1-P3, P5: CNI_* variables and CNI_ARGS, through the installed executable and in-process."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from cniplugin.protocol.env import parse_cni_args, parse_env
from cniplugin.protocol.errors import InvalidEnvironment
from harness.host import run_plugin
from harness.plugin import details_repeat

CONFIG = {"cniVersion": "1.0.0", "name": "rtA-net", "type": "route-tune", "mode": "disabled",
          "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.9.0.5/24"}]}}


def error_bytes(code: int, msg: str, details: str = "", version: str = "1.0.0") -> bytes:
    reply = {"cniVersion": version, "code": code, "msg": msg}
    if details:
        reply["details"] = details
    return json.dumps(reply, indent=4, ensure_ascii=False).encode()


def assert_error(proc, code: int, msg: str, details: str = "", version: str = "1.0.0") -> None:
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == error_bytes(code, msg, details, version)
    assert b"Traceback" not in proc.stdout + proc.stderr


def test_p1_no_command_prints_about_on_stderr_and_exits_0(cni_env):
    del cni_env["CNI_COMMAND"]
    proc = run_plugin(cni_env, CONFIG)
    assert (proc.returncode, proc.stdout) == (0, b"")
    assert proc.stderr.decode() == ("CNI route-tune plugin v0.1.0\nCNI protocol versions "
                                    "supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0\n")


def test_p1_empty_command_is_the_same_as_unset(cni_env):
    proc = run_plugin({**cni_env, "CNI_COMMAND": ""}, CONFIG)
    assert (proc.returncode, proc.stdout) == (0, b"")
    assert proc.stderr.startswith(b"CNI route-tune plugin v")


@pytest.mark.parametrize("command", ["FOO", "add", "VERSIONS"])
def test_p1_unknown_command_is_code_4_naming_it(cni_env, command):
    proc = run_plugin({**cni_env, "CNI_COMMAND": command}, CONFIG)
    # stdin is not read for a command we do not know, so the reply speaks our newest version
    assert_error(proc, 4, f"unknown CNI_COMMAND: {command}", version="1.1.0")


@pytest.mark.parametrize("missing, command, named", [
    (["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"], "ADD", "CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME"),
    (["CNI_NETNS"], "ADD", "CNI_NETNS"),
    (["CNI_NETNS"], "CHECK", "CNI_NETNS"),
    (["CNI_PATH"], "ADD", "CNI_PATH"),
    (["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"], "DEL", "CNI_CONTAINERID,CNI_IFNAME,CNI_PATH"),
    (["CNI_PATH"], "GC", "CNI_PATH"),
    (["CNI_PATH"], "STATUS", "CNI_PATH"),
])
def test_p2_all_missing_variables_named_in_one_error(cni_env, missing, command, named):
    env = {k: v for k, v in cni_env.items() if k not in missing}
    proc = run_plugin({**env, "CNI_COMMAND": command}, CONFIG)
    assert_error(proc, 4, f"required env variables [{named}] missing")


def test_p2_netns_is_optional_for_del(cni_env):
    env = {k: v for k, v in cni_env.items() if k != "CNI_NETNS"}
    proc = run_plugin({**env, "CNI_COMMAND": "DEL"}, CONFIG)
    assert (proc.returncode, proc.stdout) == (0, b"")


def test_p2_empty_variable_counts_as_missing(cni_env):
    proc = run_plugin({**cni_env, "CNI_IFNAME": ""}, CONFIG)
    assert_error(proc, 4, "required env variables [CNI_IFNAME] missing")


@pytest.mark.parametrize("ifname, msg", [
    ("a" * 16, "interface name is too long"),
    (".", "interface name is . or .."),
    ("..", "interface name is . or .."),
    ("a/b", "interface name contains / or : or whitespace characters"),
    ("a:b", "interface name contains / or : or whitespace characters"),
    ("a b", "interface name contains / or : or whitespace characters"),
    ("a\tb", "interface name contains / or : or whitespace characters"),
])
def test_p3_bad_ifname_is_code_4(cni_env, ifname, msg):
    proc = run_plugin({**cni_env, "CNI_IFNAME": ifname}, CONFIG)
    details = "interface name should be less than 16 characters" if "long" in msg else ""
    assert_error(proc, 4, msg, details)


def test_p3_fifteen_char_ifname_is_fine(cni_env):
    proc = run_plugin({**cni_env, "CNI_IFNAME": "a" * 15}, CONFIG)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("container_id", ["-abc", "a b", "a/b", "_x", "abc$", "ü1"])
def test_p3_bad_container_id_is_code_4(cni_env, container_id):
    proc = run_plugin({**cni_env, "CNI_CONTAINERID": container_id}, CONFIG)
    assert_error(proc, 4, "invalid characters in containerID", container_id)


def test_p5_error_is_one_json_object_and_logs_stay_on_stderr(cni_env):
    proc = run_plugin({**cni_env, "CNI_COMMAND": "NOPE"}, CONFIG)
    reply = json.loads(proc.stdout)  # exactly one JSON document, nothing before or after
    assert set(reply) <= {"cniVersion", "code", "msg", "details"}
    assert b"NOPE" in proc.stderr  # the failure is logged, on stderr only


def test_i2_multus_style_cni_args_are_accepted(cni_env):
    args = ("IgnoreUnknown=true;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=pod-1;"
            "K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1;K8S_POD_NAME=pod-1;"
            "MAC=c2:11:22:33:44:55;IP=10.9.0.5,fd00::5")
    config = {**CONFIG, "args": {"cni": {"labels": ["x"]}}, "runtimeConfig": {"mac": "c2:1:1:1:1:1"}}
    proc = run_plugin({**cni_env, "CNI_ARGS": args}, config)
    assert proc.returncode == 0, proc.stdout
    assert json.loads(proc.stdout)["ips"] == [{"address": "10.9.0.5/24"}]


# ---------------------------------------------------------------- parse_cni_args (in-process)

def test_cni_args_multus_shape():
    args = parse_cni_args("IgnoreUnknown=true;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;"
                          "K8S_POD_INFRA_CONTAINER_ID=cid;K8S_POD_UID=uid;MAC=aa:bb:cc:dd:ee:ff;"
                          "IP=10.0.0.1, fd00::1,")
    assert (args.ignore_unknown, args.pod_namespace, args.pod_name, args.infra_container_id,
            args.pod_uid, args.mac, args.ips) == (
        True, "ns", "p", "cid", "uid", "aa:bb:cc:dd:ee:ff", ("10.0.0.1", "fd00::1"))


def test_cni_args_duplicates_last_non_empty_wins_and_all_are_kept():
    args = parse_cni_args("K8S_POD_NAME=;K8S_POD_NAME=first;K8S_POD_NAME=second;K8S_POD_NAME=")
    assert args.pod_name == "second"
    assert args.get_all("K8S_POD_NAME") == ("", "first", "second", "")


def test_cni_args_malformed_segments_are_kept_aside_not_fatal():
    args = parse_cni_args(";novalue;=x;A=b=c;;B=")
    assert args.pairs == (("A", "b=c"), ("B", ""))
    assert args.invalid == ("novalue", "=x")
    assert not args.ignore_unknown and args.ips == ()


_keys = st.text(st.characters(blacklist_characters=";=", blacklist_categories=("Cs",)),
                min_size=1, max_size=12)
_values = st.text(st.characters(blacklist_characters=";", blacklist_categories=("Cs",)),
                  max_size=12)


@given(st.lists(st.tuples(_keys, _values), max_size=8))
def test_cni_args_round_trip(pairs):
    args = parse_cni_args(";".join(f"{k}={v}" for k, v in pairs))
    assert args.pairs == tuple(pairs) and args.invalid == ()
    for key, _ in pairs:
        non_empty = [v for k, v in pairs if k == key and v]
        assert args.get(key) == (non_empty[-1] if non_empty else "")


@given(st.text(max_size=60))
def test_cni_args_never_raises(text):
    args = parse_cni_args(text)
    assert all(key and "=" not in key for key, _ in args.pairs)


def test_env_records_are_immutable_values():
    # CniArgs/CniEnv/NodeDefaults are plain records (no dataclasses import on light paths) that
    # keep the dataclass(frozen=True) behaviour: value equality, hash, repr, no assignment.
    import copy
    import pickle

    from cniplugin.protocol.env import CniArgs, CniEnv, NodeDefaults
    args = parse_cni_args("A=b;x")
    assert args == CniArgs(pairs=(("A", "b"),), invalid=("x",)) and hash(args) == hash(
        CniArgs((("A", "b"),), ("x",)))
    assert repr(args) == "CniArgs(pairs=(('A', 'b'),), invalid=('x',))"
    env = CniEnv("DEL", netns="/n", args=args)
    assert (env.container_id, env.path, CniEnv("DEL").args) == ("", "", CniArgs())
    assert copy.deepcopy(env) == env == pickle.loads(pickle.dumps(env)) != CniEnv("ADD")
    with pytest.raises(AttributeError):
        env.netns = "/other"
    assert NodeDefaults("p").values == {} and NodeDefaults("p").values is not NodeDefaults("p").values
    with pytest.raises(TypeError):
        CniEnv()


# ---------------------------------------------------------------- parse_env (in-process)

_ENV_VARS = ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"]
_GOOD = {"CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/a", "CNI_IFNAME": "eth0",
         "CNI_PATH": "/opt/cni/bin"}
_REQUIRED = {"ADD": ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"],
             "CHECK": ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"],
             "DEL": ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"],
             "GC": ["CNI_PATH"], "STATUS": ["CNI_PATH"], "VERSION": []}


@given(st.sampled_from(sorted(_REQUIRED)), st.sets(st.sampled_from(sorted(_GOOD))))
def test_env_validator_names_exactly_the_missing_required_vars(command, absent):
    environ = {"CNI_COMMAND": command, **{k: v for k, v in _GOOD.items() if k not in absent}}
    missing = [v for v in _ENV_VARS if v in _REQUIRED[command] and v in absent]
    if missing:
        with pytest.raises(InvalidEnvironment) as err:
            parse_env(environ)
        assert err.value.msg == f"required env variables [{','.join(missing)}] missing"
        assert err.value.code == 4
    else:
        env = parse_env(environ)
        assert env.command == command


@given(st.text(max_size=20))
def test_env_validator_ifname_rule(ifname):
    environ = {"CNI_COMMAND": "ADD", **_GOOD, "CNI_IFNAME": ifname}
    valid = (0 < len(ifname.encode()) <= 15 and ifname not in (".", "..")
             and not any(c in "/:" or c.isspace() for c in ifname))
    if valid:
        assert parse_env(environ).ifname == ifname
    else:
        with pytest.raises(InvalidEnvironment):
            parse_env(environ)


@given(st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]{0,40}", fullmatch=True))
def test_env_validator_accepts_every_valid_container_id(container_id):
    assert parse_env({"CNI_COMMAND": "DEL", **_GOOD,
                      "CNI_CONTAINERID": container_id}).container_id == container_id


@pytest.mark.parametrize("env_change, config_change", [
    ({"CNI_IFNAME": "x" * 16}, {}),
    ({"CNI_CONTAINERID": "bad id!"}, {}),
    ({}, {"name": "bad name!"}),
    ({}, {"cniVersion": "0.2.0"}),
    ({}, {"prevResult": {"cniVersion": "9.9.9"}}),
    ({}, {"mode": "overlay", "podRPFilter": 9, "vethMTU": 0, "txQueueLen": -1}),
    ({}, {"mode": "overlay", "prevResult": None}),
    ({"CNI_COMMAND": "CHECK"}, {"cniVersion": "0.3.1"}),
    ({"CNI_COMMAND": "GC"}, {}),
])
def test_error_details_add_to_msg_and_never_repeat_it(cni_env, env_change, config_change):
    """libcni prints ``msg; details``: what details says must not already be in msg."""
    config = {k: v for k, v in {**CONFIG, **config_change}.items() if v is not None}
    proc = run_plugin({**cni_env, **env_change}, config)
    reply = json.loads(proc.stdout)
    assert proc.returncode == 1 and reply["msg"], reply
    assert details_repeat(reply["msg"], reply.get("details", "")) == "", reply
