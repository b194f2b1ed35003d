"""The operator CLI as the e2e suites run it: ``cli`` (the installed ``cni-route-tune``, as root,
another uid or inside a netns) and ``CliPod`` (a lab with its rail chains, the CLI pointed at
it, built by ``make_pod``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cniplugin.lab.runtime import PluginEnv, PyRuntime, RailPod
from cniplugin.lab.topology import OverlayLab
from harness.host import CNI_ROUTE_TUNE, require, require_root, run_plugin
from harness.lab import NAMES

CID = "cli-pod-1"


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


def cli(*args: str, defaults: Path | None = None, user: int | None = None,
        inside: str | None = None) -> Run:
    """Run the installed ``cni-route-tune`` (optionally as another uid, via setpriv, or inside
    netns ``inside``, as an operator on the node would)."""
    env = dict(os.environ)
    if defaults is not None:
        env["ROUTE_TUNE_DEFAULTS"] = str(defaults)
    wrap = ("setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups") if user is not None else ()
    proc = run_plugin(env, executable=CNI_ROUTE_TUNE, args=args, netns=inside, wrap=wrap, cwd="/")
    return Run(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


@dataclass
class CliPod:
    """A lab, its plugin environment and its rail chains, plus the CLI pointed at them."""

    lab: OverlayLab
    penv: PluginEnv
    pod: RailPod

    @property
    def node_netns(self) -> str:
        return f"/run/netns/{self.lab.node}"

    def cli(self, *args: str, user: int | None = None, on_node: bool = False) -> Run:
        return cli(*args, defaults=self.penv.defaults_file, user=user,
                   inside=self.lab.node if on_node else None)

    def conflist_file(self, k: int) -> Path:
        path = self.penv.workdir / f"rail{k}.conflist"
        path.write_text(json.dumps(self.pod.conflist(k), indent=1))
        return path


def make_pod(workdir: Path, family: str, rails: int, add: bool = True) -> CliPod:
    lab = OverlayLab(NAMES.next(), rails=rails, family=family).__enter__()
    penv = PluginEnv(workdir / lab.prefix, family=family)
    pod = RailPod(lab, penv, PyRuntime(lab.node, penv), container_id=CID)
    if add:
        pod.add_all()
    return CliPod(lab, penv, pod)


def require_lab() -> None:
    require_root("ip", "setpriv")
    require("" if Path("/usr/lib/cni/macvlan").exists() else
            "needs containernetworking-plugins (/usr/lib/cni/macvlan)")
