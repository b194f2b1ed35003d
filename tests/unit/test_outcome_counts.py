"""What dispatch's ``Outcome`` carries for the transports' counts (the CNI result code and the
``Invocation``'s state dir), and the in-process count built on it: the reply is not parsed, and
the node defaults file is not read a second time once the request's ``Invocation`` was built."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cniplugin.protocol import dispatch
from cniplugin.protocol.dispatch import Outcome, error_outcome, run
from cniplugin.protocol.errors import TryAgainLater
from cniplugin.transport import inprocess_counts, plugin
from harness.plugin import PREV, request_env


def stdin(**keys: object) -> bytes:
    return json.dumps({"cniVersion": "1.0.0", "name": "rtA-net", "type": "route-tune",
                       "prevResult": PREV, **keys}).encode()


def passes_through(inv):
    return inv.prev_result


def gateway_down(inv):
    raise TryAgainLater("gateway 10.9.0.1 did not answer")


def explodes(inv):
    raise ZeroDivisionError("boom")


def counted(state_dir: Path) -> dict[str, int]:
    """The count files as the plugin left them: name -> size (= requests)."""
    directory = state_dir / inprocess_counts.COUNTS_DIR
    if not directory.exists():
        return {}
    return {name: (directory / name).stat().st_size for name in sorted(os.listdir(directory))}


# ---------------------------------------------------------------- Outcome


@pytest.mark.parametrize("engine, code", [(passes_through, 0), (gateway_down, 11),
                                          (explodes, 999)])
def test_outcome_carries_the_code_and_the_invocations_state_dir(tmp_path, engine, code):
    out = run(request_env(tmp_path), stdin(), engine)
    assert (out.exit_code, out.code, out.state_dir) == (int(code != 0), code,
                                                         str(tmp_path / "state"))
    if code:  # the code is the one the reply names (nobody has to parse it to know)
        assert json.loads(out.stdout)["code"] == code


def test_a_del_without_config_model_carries_the_node_state_dir(tmp_path):
    """A DEL whose netns is gone has no config model; its Invocation's state dir is the node's."""
    out = run(request_env(tmp_path, "DEL"), stdin(), lambda inv: None)
    assert (out.exit_code, out.code, out.state_dir) == (0, 0, str(tmp_path / "state"))


@pytest.mark.parametrize("environ, body, code", [
    ({"CNI_COMMAND": "VERSION"}, b"", 0),
    ({"CNI_COMMAND": ""}, b"", 0),                             # the about text
    ({"CNI_CONTAINERID": ""}, stdin(), 4),
    ({}, b"{not json", 6),
    ({}, stdin(podRPFilter=7), 7),
    ({}, stdin(cniVersion="9.9.9"), 1),
])
def test_outcome_before_an_invocation_has_the_code_and_no_state_dir(tmp_path, environ, body,
                                                                    code):
    out = run({**request_env(tmp_path), **environ}, body, explodes)
    assert (out.code, out.state_dir) == (code, None)
    if code:
        assert json.loads(out.stdout)["code"] == code


def test_outcome_equality_and_repr_cover_every_field():
    assert "__dict__" not in dir(Outcome(b"", 0))  # still __slots__ only
    assert Outcome(b"", 0) == Outcome(b"", 0, b"", code=0, state_dir=None)
    assert Outcome(b"x", 1).code is None  # built without one: unknown, counted as "other"
    assert Outcome(b"", 0, state_dir="/a") != Outcome(b"", 0, state_dir="/b")
    assert Outcome(b"{}", 1, code=7) != Outcome(b"{}", 1, code=11)
    assert repr(Outcome(b"", 0, state_dir="/run/rt")) == (
        "Outcome(stdout=b'', exit_code=0, stderr=b'', code=0, state_dir='/run/rt')")
    failed = error_outcome(TryAgainLater("later"), "1.0.0", state_dir="/run/rt")
    assert (failed.exit_code, failed.code, failed.state_dir) == (1, 11, "/run/rt")
    assert dispatch.error_outcome(TryAgainLater("later")).state_dir is None


# ---------------------------------------------------------------- the in-process count


@pytest.fixture
def state_dir_lookups(monkeypatch) -> list:
    """Every time the counter falls back to the node defaults file (``node_state_dir``)."""
    calls: list = []
    real = inprocess_counts.node_state_dir

    def spy(environ):
        calls.append(environ.get("CNI_COMMAND"))
        return real(environ)
    monkeypatch.setattr(inprocess_counts, "node_state_dir", spy)
    return calls


def test_in_process_requests_are_counted_in_the_state_dir_without_a_second_read(
        tmp_path, monkeypatch, state_dir_lookups):
    """The executable's in-process path (``serve_in_process``): an ADD that succeeds, one that
    fails with code 11, a disabled ADD (no engine) and a DEL count under their names in the
    configured stateDir, and none of them reads the node defaults again; a request refused
    before its Invocation existed still counts there, through the node defaults."""
    engines = iter([passes_through, gateway_down, lambda inv: None])
    monkeypatch.setattr(plugin, "_engine", lambda inv: next(engines)(inv))
    state = tmp_path / "state"

    assert plugin.serve_in_process(request_env(tmp_path), stdin()).exit_code == 0
    failed = plugin.serve_in_process(request_env(tmp_path), stdin())
    assert json.loads(failed.stdout)["code"] == 11
    assert plugin.serve_in_process(request_env(tmp_path), stdin(mode="disabled")).code == 0
    assert plugin.serve_in_process(request_env(tmp_path, "DEL"), stdin()).code == 0
    assert counted(state) == {"ADD.0": 2, "ADD.11": 1, "DEL.0": 1}
    assert state_dir_lookups == []

    assert plugin.serve_in_process(request_env(tmp_path), stdin(podRPFilter=7)).code == 7
    assert counted(state) == {"ADD.0": 2, "ADD.11": 1, "ADD.7": 1, "DEL.0": 1}
    assert state_dir_lookups == ["ADD"]


def test_record_outcome_with_a_known_state_dir_reads_no_file(tmp_path, monkeypatch):
    def no_read(environ):
        raise AssertionError("the node defaults file was read")
    monkeypatch.setattr("cniplugin.protocol.env.read_node_defaults", no_read)
    environ = request_env(tmp_path)
    inprocess_counts.record_outcome(environ, "ADD", 11, str(tmp_path / "elsewhere"))
    inprocess_counts.record_outcome(environ, "CHECK", 0, str(tmp_path / "elsewhere"))
    assert counted(tmp_path / "elsewhere") == {"ADD.11": 1, "CHECK.0": 1}
    assert counted(tmp_path / "state") == {}
