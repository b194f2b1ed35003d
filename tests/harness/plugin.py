"""Running route-tune as a runtime does: ``Reply``, ``assert_ok``, ``assert_cni_error``, ``Rig``,
and ``request_env`` (+ ``PREV``): a request needing no namespace.

``Rig``: a lab plus everything one engine mode needs: its own node defaults, state and log dirs,
the Python runtime (``PyRuntime``), and in resident mode a ``cni-route-tune serve`` inside the
lab's node netns. ``close()`` stops the server and fails if resident mode served nothing (a plugin
that silently ran in-process would make every resident test vacuous). ``Rig.rt(command, k,
prev)`` runs route-tune ALONE, exactly as a runtime calls it (env + stdin, inside the node netns).
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from cniplugin._version import SUPPORTED_VERSIONS
from cniplugin.lab.runtime import PluginEnv, PyRuntime, RailPod, rail_conflist
from cniplugin.lab.topology import OverlayLab
from harness.host import run_plugin
from harness.resident import Resident, served_count
from harness.snapshot import assert_same, snapshot, state_files


@dataclass
class Reply:
    """What one plugin process printed and returned."""

    code: int
    stdout: bytes
    stderr: bytes

    @property
    def json(self):
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return (f"exit {self.code}\nstdout: {self.stdout.decode(errors='replace')[:2000]}\n"
                f"stderr: {self.stderr.decode(errors='replace')[-2000:]}")


def details_repeat(msg: str, details: str) -> str:
    """What a CNI error's ``details`` repeats of its ``msg`` ("" if nothing). libcni prints
    ``msg; details``, so details must only add: no "; "-separated part may already be in msg."""
    for part in (p.strip() for p in details.split("; ")):
        if len(part) >= 8 and part in msg:
            return part
    return ""


def assert_ok(reply: Reply) -> None:
    """Exit 0 (the whole reply in the failure message)."""
    assert reply.code == 0, str(reply)


def assert_cni_error(reply: Reply, code: int | tuple[int, ...]) -> dict:
    """Exit 1 and exactly ONE well-formed CNI error object on stdout with ``code``."""
    assert reply.code == 1, str(reply)
    text = reply.stdout.decode()
    err = json.loads(text)  # the whole stdout is one JSON document (raises otherwise)
    assert isinstance(err, dict), str(reply)
    assert set(err) <= {"cniVersion", "code", "msg", "details"}, str(reply)
    assert err.get("cniVersion") in SUPPORTED_VERSIONS, str(reply)
    assert isinstance(err.get("code"), int) and isinstance(err.get("msg"), str) and err["msg"], \
        str(reply)
    assert isinstance(err.get("details", ""), str), str(reply)
    codes = code if isinstance(code, tuple) else (code,)
    assert err["code"] in codes, f"want code {codes}, got:\n{reply}"
    repeated = details_repeat(err["msg"], err.get("details", ""))
    assert not repeated, f"details repeats msg ({repeated!r}):\n{reply}"
    return err


#: A rail's prevResult for requests that need no namespace (its sandbox is never opened).
PREV = {"cniVersion": "1.0.0", "interfaces": [{"name": "net1", "sandbox": "/run/netns/p"}],
        "ips": [{"address": "10.9.0.5/24", "gateway": "10.9.0.1", "interface": 0}]}


def request_env(tmp: Path, command: str = "ADD", **extra: str) -> dict[str, str]:
    """A request's environment needing no namespace: node defaults in ``tmp`` whose log dir is
    ``tmp/log`` and state dir ``tmp/state``; ``extra`` adds or overrides variables."""
    defaults = tmp / "defaults.json"
    defaults.write_text(json.dumps({"logDir": str(tmp / "log"), "stateDir": str(tmp / "state")}))
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": "rtA-c1", "CNI_NETNS": "/run/netns/rtA-x",
            "CNI_IFNAME": "net1", "CNI_PATH": "/usr/lib/cni", "ROUTE_TUNE_DEFAULTS": str(defaults),
            **extra}


@dataclass
class Rig:
    """A lab plus everything one engine mode needs; see the module docstring."""

    lab: OverlayLab
    engine: str
    defaults: dict = field(default_factory=dict)
    container_id: str = "rtr-pod-1"
    server_env: dict = field(default_factory=dict)  # the resident server's extra environment
    penv: PluginEnv = field(init=False)
    server: Resident | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        workdir = self.lab.tmp / "penv"
        self.penv = PluginEnv(workdir, family=self.lab.family, defaults=dict(self.defaults),
                              env={"ROUTE_TUNE_ENGINE": self.engine})
        if self.engine == "resident":
            self.server = Resident(self.lab.node, self.penv, extra_env=self.server_env)
            self.penv.env.update(self.server.env)
            self.server.start()
        self.runtime = PyRuntime(self.lab.node, self.penv)
        self.plugins_called = 0

    # -- pods: the full chain, or the interface alone (route-tune then called by hand) ------
    def pod(self, **kw) -> RailPod:
        """The seed pod's rail chains ``[macvlan + host-local, route-tune]`` (keys via ``kw``)."""
        self.plugins_called += 1
        return RailPod(self.lab, self.penv, self.runtime, container_id=self.container_id, **kw)

    def bare(self) -> RailPod:
        """The rail chains without route-tune: ``add(k)`` gives the prevResult route-tune gets."""
        return RailPod(self.lab, self.penv, self.runtime, container_id=self.container_id,
                       chained=None)

    def conf(self, k: int, keys: dict | None = None, cni_version: str = "1.0.0") -> dict:
        """Rail k's route-tune plugin config as the runtime hands it (name + cniVersion)."""
        conflist = rail_conflist(k, self.lab.family, keys or {}, data_dir=self.penv.ipam_dir,
                                 cni_version=cni_version)
        return {**conflist["plugins"][-1], "name": conflist["name"], "cniVersion": cni_version}

    def env(self, command: str, ifname: str, *, netns: str | None = None,
            container_id: str | None = None, extra: dict | None = None) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self.penv.env,
                "CNI_PATH": self.penv.cni_path, "CNI_COMMAND": command,
                "CNI_CONTAINERID": self.container_id if container_id is None else container_id,
                "CNI_NETNS": self.lab.pod_netns if netns is None else netns,
                "CNI_IFNAME": ifname, "CNI_ARGS": "", **(extra or {})}

    def exec_plugin(self, env: dict[str, str], stdin: bytes | str | dict) -> Reply:
        """Run the installed ``route-tune`` inside the node netns with exactly ``env``/``stdin``."""
        self.plugins_called += 1
        proc = run_plugin(env, stdin, netns=self.lab.node)
        return Reply(proc.returncode, proc.stdout, proc.stderr)

    def rt(self, command: str, k: int, prev: dict | None = None, *, keys: dict | None = None,
           netns: str | None = None, extra_env: dict | None = None, ifname: str | None = None,
           container_id: str | None = None) -> Reply:
        """route-tune alone for rail k (``prev`` = prevResult; None sends none)."""
        conf = self.conf(k, keys)
        if prev is not None:
            conf["prevResult"] = prev
        env = self.env(command, ifname or f"net{k}", netns=netns, container_id=container_id,
                       extra=extra_env)
        return self.exec_plugin(env, conf)

    # -- state ----------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Pod + node (both families, all tables, links, neighbours, sysctls, nft) + state files."""
        return snapshot(self.lab, self.penv.state_dir)

    def assert_unchanged(self, before: dict, what: str = "") -> None:
        assert_same(before, self.snapshot(), what)

    def state_records(self) -> list[str]:
        return [f for f in state_files(self.penv.state_dir) if f.endswith(".json")]

    def close(self) -> None:
        try:
            if self.server is not None:
                status = self.server.stop()
                assert status in (0, -signal.SIGKILL, None), \
                    f"server exited {status}:\n{self.server.log()[-3000:]}"
                if self.plugins_called:
                    assert served_count(self.penv) > 0, (
                        "resident mode, but the server served no request: the plugin ran "
                        "in-process, so this test proved nothing about the resident engine")
        finally:
            self.lab.close()
