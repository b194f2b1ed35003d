"""The one request constructor, ``protocol.invocation.from_request``: the plugin's dispatch and the
CLI's ``plan``/``verify`` get equal ``Invocation``s for the same request, and its checks hold."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from cniplugin.cli.request import build_invocation
from cniplugin.protocol.dispatch import run
from cniplugin.protocol.errors import IncompatibleVersion, InvalidConfig, NotChained
from cniplugin.protocol.invocation import Invocation, from_request
from harness.plugin import PREV, request_env

#: The pod a runtime names in CNI_ARGS.
POD_ARGS = {"CNI_ARGS": "K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=trainer-0"}


def dispatched(environ: dict, config: dict) -> Invocation:
    """The Invocation the plugin's dispatch hands its engine."""
    seen = []

    def engine(inv):
        seen.append(inv)
        return inv.prev_result

    out = run(environ, json.dumps(config).encode(), engine)
    assert out.exit_code == 0, out.stdout
    (inv,) = seen
    return inv


def from_cli(tmp: Path, environ: dict, config: dict, command: str) -> Invocation:
    conf = tmp / "conf.json"
    conf.write_text(json.dumps(config))
    envfile = tmp / "env"
    envfile.write_text("".join(f"{k}={v}\n" for k, v in environ.items()))
    args = argparse.Namespace(config=str(conf), network=None, prev_result=None, env=str(envfile),
                              ifname=None, container_id=None, defaults=None)
    inv, _ = build_invocation(args, command)
    return inv


CONFIGS = st.fixed_dictionaries(
    {"cniVersion": st.sampled_from(["0.4.0", "1.0.0", "1.1.0"]),
     "mode": st.sampled_from(["auto", "overlay", "underlay"]),
     "hostRuleTable": st.just(500),
     "serviceCIDR": st.lists(st.sampled_from(["10.96.0.0/12", "fd00:96::/108"]), unique=True),
     "tunePodRoutes": st.booleans(),
     "podRPFilter": st.integers(-1, 2)},
    optional={"cniVersions": st.lists(st.sampled_from(["0.3.1", "1.0.0", "1.1.0"]), max_size=2),
              "detectOptions": st.fixed_dictionaries({"retries": st.integers(1, 5)})})


@settings(max_examples=25, deadline=None)
@given(config=CONFIGS, command=st.sampled_from(["ADD", "CHECK"]))
def test_dispatch_and_the_cli_build_equal_invocations(config, command):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = {"name": "rtA-net", "type": "route-tune", **config, "prevResult": PREV}
        environ = request_env(tmp, command, **POD_ARGS)
        inv = dispatched(environ, config)
        assert inv == from_cli(tmp, environ, config, command)
        assert inv == from_request(environ, config)  # bytes or the decoded object: the same
        assert (inv.command, inv.container_id, inv.ifname, inv.network, inv.state_dir) == (
            command, "rtA-c1", "net1", "rtA-net", str(tmp / "state"))


def test_a_del_whose_netns_is_gone_has_no_config_and_reads_the_node_defaults(tmp_path):
    environ = request_env(tmp_path, "DEL", CNI_NETNS=str(tmp_path / "gone"), **POD_ARGS)
    config = {"cniVersion": "1.0.0", "name": "rtA-net", "type": "route-tune", "mode": "disable"}
    assert from_request(environ, json.dumps(config).encode()) == Invocation(
        command="DEL", container_id="rtA-c1", ifname="net1", netns=str(tmp_path / "gone"),
        network="rtA-net", cni_version="1.0.0", state_dir=str(tmp_path / "state"), raw=config,
        disabled=True, pod_namespace="team-a", pod_name="trainer-0")


def test_the_config_holds_the_normalised_mode(tmp_path):
    config = {"cniVersion": "1.0.0", "name": "rtA-net", "type": "route-tune", "mode": "disable",
              "prevResult": PREV}
    inv = from_request(request_env(tmp_path), config)
    assert (inv.config.mode, inv.disabled) == ("disabled", True)


def test_add_must_be_chained_even_when_disabled(tmp_path):
    config = {"cniVersion": "1.0.0", "name": "rtA-net", "type": "route-tune", "mode": "disabled"}
    with pytest.raises(NotChained) as err:
        from_request(request_env(tmp_path), config)
    assert (err.value.code, err.value.cni_version) == (7, "1.0.0")


def test_errors_after_negotiation_carry_the_negotiated_version(tmp_path):
    config = {"cniVersion": "1.0.0", "cniVersions": ["1.1.0"], "name": "rtA-net",
              "type": "route-tune", "hostRuleTable": 254, "prevResult": PREV}
    with pytest.raises(InvalidConfig) as err:
        from_request(request_env(tmp_path), config)
    assert err.value.cni_version == "1.1.0"
    reply = run(request_env(tmp_path), json.dumps(config).encode(), lambda inv: None)
    assert json.loads(reply.stdout)["cniVersion"] == "1.1.0"


def test_command_gates_and_name_check_come_before_the_config(tmp_path):
    config = {"cniVersion": "0.3.1", "name": "rtA-net", "type": "route-tune", "mode": 5}
    with pytest.raises(IncompatibleVersion, match="does not allow CHECK"):
        from_request(request_env(tmp_path, "CHECK"), config)
    with pytest.raises(InvalidConfig, match="missing network name"):
        from_request(request_env(tmp_path), {**config, "name": ""})


def test_replace_checks_again(tmp_path):
    config = {"cniVersion": "1.0.0", "name": "rtA-net", "type": "route-tune", "prevResult": PREV}
    inv = from_request(request_env(tmp_path, **POD_ARGS), config)
    fields = {name: getattr(inv, name) for name in Invocation._fields}
    moved = inv.replace(state_dir="/x")
    assert {name: getattr(moved, name) for name in Invocation._fields} == {**fields, "state_dir": "/x"}
    assert {name: getattr(inv, name) for name in Invocation._fields} == fields  # inv itself unchanged
    assert inv.state_dir != "/x" and moved == Invocation(**{**fields, "state_dir": "/x"})
    with pytest.raises(NotChained):
        inv.replace(prev_result=None)
