"""Start-up cost: the cheap paths import neither pydantic nor pyroute2 (checked with the
interpreter's own import trace, ``-X importtime``), and bin/route-tune runs from a checkout.

The executable is the native forwarder, which starts the in-process plugin with ``python -I``
(environment ignored), so the traced runs use a forwarder built like the real one whose
interpreter is a wrapper adding ``-X importtime``."""

from __future__ import annotations

import json
import subprocess


import pytest

from harness.host import CNI_ROUTE_TUNE, REPO, VENV_BIN, run_plugin
from cniplugin.transport import native

HEAVY = ("pydantic", "pyroute2", "netaddr")


def imported_modules(proc) -> set[str]:
    names = set()
    for line in proc.stderr.decode().splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    assert names, "no import trace on stderr"
    return names


def assert_light(proc) -> None:
    heavy = {name for name in imported_modules(proc) if name.split(".")[0] in HEAVY}
    assert not heavy, f"heavy imports on a cheap path: {sorted(heavy)}"


TRACE = {"PYTHONPROFILEIMPORTTIME": "1"}  # for the console script cni-route-tune


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """A native forwarder whose in-process interpreter traces its imports."""
    if native.compiler() is None:
        pytest.fail("no C compiler: bin/dev setup installs gcc")
    tmp = tmp_path_factory.mktemp("traced")
    wrapper = tmp / "python"
    wrapper.write_text(f'#!/bin/sh\nexec {VENV_BIN / "python"} -X importtime "$@"\n')
    wrapper.chmod(0o755)
    return native.build(tmp / "route-tune", python=str(wrapper))


def test_version_command_is_light(traced):
    proc = run_plugin({"CNI_COMMAND": "VERSION"}, b"", executable=traced)
    assert proc.returncode == 0
    assert_light(proc)


def test_about_text_is_light(traced):
    proc = run_plugin({}, b"", executable=traced)
    assert proc.returncode == 0 and b"CNI route-tune plugin" in proc.stderr
    assert_light(proc)


def test_plugin_dash_dash_version_is_light(traced):
    proc = run_plugin({}, executable=traced, args=("--version",))
    assert proc.stdout == (b"route-tune 0.1.0\nCNI protocol versions supported: "
                           b"0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0\n")
    assert_light(proc)


def test_cli_version_is_light():
    proc = run_plugin(TRACE, executable=CNI_ROUTE_TUNE, args=("--version",))
    assert proc.stdout == b"route-tune 0.1.0 (CNI 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0)\n"
    assert_light(proc)


def test_cli_help_lists_subcommands():
    proc = run_plugin({}, executable=CNI_ROUTE_TUNE, args=("--help",))
    assert proc.returncode == 0 and b"demo" in proc.stdout


def _del_gone_netns_env(tmp_path) -> dict:
    defaults = tmp_path / "defaults.json"
    defaults.write_text(json.dumps({"logDir": str(tmp_path / "log"),
                                    "stateDir": str(tmp_path / "state")}))
    return {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "rtA-c1", "CNI_IFNAME": "net1",
            "CNI_NETNS": "/run/netns/rtA-gone", "CNI_PATH": "/usr/lib/cni",
            "ROUTE_TUNE_DEFAULTS": str(defaults)}


def test_disabled_del_with_gone_netns_is_light(tmp_path, traced):
    config = {"cniVersion": "1.0.0", "name": "rtA-net", "type": "route-tune", "mode": "disabled"}
    proc = run_plugin(_del_gone_netns_env(tmp_path), config, executable=traced)
    assert (proc.returncode, proc.stdout) == (0, b"")
    assert_light(proc)


def test_del_with_gone_netns_and_no_state_is_light(tmp_path, traced):
    config = {"cniVersion": "1.0.0", "name": "rtA-net", "type": "route-tune"}
    proc = subprocess.run(["unshare", "-n", str(traced)], input=json.dumps(config).encode(),
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                               **_del_gone_netns_env(tmp_path)},
                          capture_output=True, check=False)
    assert (proc.returncode, proc.stdout) == (0, b"")
    assert_light(proc)


#: Imported by nothing on the light paths: ``dataclasses`` pulls in inspect/ast/dis/tokenize and
#: ``typing`` is as big; together they cost more than the rest of a light command.
LIGHT_PATH_STDLIB = ("dataclasses", "typing", "inspect")


def test_light_paths_skip_dataclasses_and_typing(tmp_path, traced):
    config = {"cniVersion": "1.0.0", "name": "rtA-net", "type": "route-tune", "mode": "disabled"}
    for proc in (run_plugin({"CNI_COMMAND": "VERSION"}, b"", executable=traced),
                 run_plugin(_del_gone_netns_env(tmp_path), config, executable=traced)):
        assert proc.returncode == 0
        assert not imported_modules(proc) & set(LIGHT_PATH_STDLIB)


def test_add_skips_pydantic_plugin_discovery_and_openssl(tmp_path, traced):
    # pydantic's plugin loader imports importlib.metadata and scans every installed
    # distribution; route-tune's models are built without it (cniplugin/_pydantic_setup.py, used by the executable).
    env = {**_del_gone_netns_env(tmp_path), "CNI_COMMAND": "ADD"}
    config = {"cniVersion": "1.0.0", "name": "rtA-net", "type": "route-tune", "mode": "disabled",
              "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.9.0.5/24"}]}}
    proc = run_plugin(env, config, executable=traced)
    assert proc.returncode == 0, proc.stdout
    modules = imported_modules(proc)
    assert "pydantic" in modules
    assert "importlib.metadata" not in modules
    # hashlib loads its built-in _sha256 only when OpenSSL's _hashlib is unavailable (the trace
    # lists the refused _hashlib import too, so its presence proves nothing).
    assert "_sha256" in modules


def test_bin_route_tune_runs_from_the_checkout():
    proc = run_plugin({"CNI_COMMAND": "VERSION"}, b"", executable=REPO / "bin" / "route-tune")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["supportedVersions"][-1] == "1.1.0"
    proc = run_plugin({}, b"", executable=REPO / "bin" / "route-tune", args=("--version",))
    assert proc.stdout.startswith(b"route-tune 0.1.0\n")
