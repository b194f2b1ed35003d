"""CNI runtimes for the lab: the real libcni (through our Go runner) and a Python mimic.

`Libcni` runs `cnirunner` (cnirunner/main.go, built offline against Debian's libcni 1.1.2)
inside the lab's node namespace, exactly where a kubelet/CRI runtime would run plugins.
`PyRuntime` reproduces libcni's observable behaviour in Python for fast unit-level paths.
Both return the parsed ADD result, or raise `CniFailure` with the plugin's code and message.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .topology import rail_ranges

RUNNER_SRC = Path(__file__).with_name("cnirunner") / "main.go"
SYSTEM_CNI_DIR = "/usr/lib/cni"
GOPATH_SYSTEM = "/usr/share/gocode"
#: Cluster values of the seed scenario (coordinator-behaviour.md §7), for the node defaults file.
CLUSTER_DEFAULTS = {
    "overlayPodCIDR": ["10.233.64.0/18"],
    "serviceCIDR": ["10.233.0.0/18"],
    "hijackCIDR": ["169.254.0.0/16"],
}
#: The IPv6 counterparts the lab adds for IPv6 and dual-stack pods (pod fd00:10:233::a4).
CLUSTER_DEFAULTS_V6 = {
    "overlayPodCIDR": ["fd00:10:233::/64"],
    "serviceCIDR": ["fd00:10:96::/108"],
    "hijackCIDR": [],
}


def cluster_defaults(family: str = "4") -> dict[str, list[str]]:
    """The node defaults' cluster CIDRs for a lab of `family` ("4", "6", "dual")."""
    out: dict[str, list[str]] = {k: [] for k in CLUSTER_DEFAULTS}
    for fam, table in (("4", CLUSTER_DEFAULTS), ("6", CLUSTER_DEFAULTS_V6)):
        if family in (fam, "dual"):
            for key, cidrs in table.items():
                out[key] += cidrs
    return out


class CniFailure(Exception):
    """A runtime call failed: the plugin's CNI error (`code`, `msg`, `details`) plus raw output."""

    def __init__(self, code: int, msg: str, details: str = "", error: str = "", stderr: str = "") -> None:
        self.code, self.msg, self.details, self.error, self.stderr = code, msg, details, error, stderr
        super().__init__(f"CNI error {code}: {error or msg}" + (f" (stderr: {stderr.strip()[-500:]})" if stderr.strip() else ""))


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "route-tune" / "cnirunner"


def build_cnirunner(cache_dir: str | os.PathLike | None = None) -> Path:
    """Build cnirunner offline in GOPATH mode; reuse the binary while main.go is unchanged.

    The binary's name carries the source hash, so an edited main.go is rebuilt and stale
    binaries never run.  A flock serialises concurrent builders (parallel test sessions).
    """
    cache = Path(cache_dir) if cache_dir else _default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(RUNNER_SRC.read_bytes()).hexdigest()[:16]
    binary = cache / f"cnirunner-{digest}"
    if binary.exists():
        return binary
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():
            return binary
        scratch = cache / "gopath"
        env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{scratch}:{GOPATH_SYSTEM}",
               "GOCACHE": str(scratch / "gocache"), "GOPROXY": "off", "GOFLAGS": "", "CGO_ENABLED": "0"}
        tmp = binary.with_suffix(".tmp")
        proc = subprocess.run(["go", "build", "-o", str(tmp), str(RUNNER_SRC)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building cnirunner failed: {proc.stderr.strip()}\n"
                               "needs: apt-get install golang-go golang-github-appc-cni-dev")
        os.replace(tmp, binary)
    return binary


def find_route_tune(explicit: str | os.PathLike | None = None) -> Path:
    """The installed `route-tune` executable: `explicit`, else next to sys.executable, else PATH."""
    candidates = [explicit, Path(sys.executable).with_name("route-tune"), shutil.which("route-tune")]
    for cand in candidates:
        if cand and Path(cand).is_file():
            return Path(cand).absolute()
    raise FileNotFoundError("route-tune executable not found (pip install the package first)")


@dataclass
class PluginEnv:
    """Everything a lab's plugin invocations share: a private CNI_PATH, node defaults, env.

    `workdir` holds `bin/` (symlink route-tune → the installed executable; /usr/lib/cni
    follows in CNI_PATH), `defaults.json` (ROUTE_TUNE_DEFAULTS, with stateDir/logDir under
    `workdir` so parallel labs never share state), `ipam/` (host-local's dataDir) and
    `cache/` (libcni's result cache).  `env` is added to the runtime's environment; libcni
    passes its environment on to plugins, so e.g. ROUTE_TUNE_ENGINE reaches route-tune.
    """

    workdir: Path
    family: str = "4"
    route_tune: Path | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        link = self.bin_dir / "route-tune"
        if not link.exists():
            link.symlink_to(find_route_tune(self.route_tune))
        for sub in ("state", "log", "ipam", "cache"):
            (self.workdir / sub).mkdir(exist_ok=True)
        node_defaults = {"stateDir": str(self.state_dir), "logDir": str(self.log_dir),
                         **cluster_defaults(self.family), **self.defaults}
        self.defaults_file.write_text(json.dumps(node_defaults, indent=1) + "\n")
        self.env = {"ROUTE_TUNE_DEFAULTS": str(self.defaults_file), **self.env}

    bin_dir = property(lambda self: self.workdir / "bin")
    state_dir = property(lambda self: self.workdir / "state")
    log_dir = property(lambda self: self.workdir / "log")
    ipam_dir = property(lambda self: self.workdir / "ipam")
    cache_dir = property(lambda self: self.workdir / "cache")
    defaults_file = property(lambda self: self.workdir / "defaults.json")

    @property
    def cni_path(self) -> str:
        return f"{self.bin_dir}:{SYSTEM_CNI_DIR}"

    def process_env(self) -> dict[str, str]:
        """The runtime's environment: ours plus CNI_PATH and the extra variables."""
        return {**os.environ, **self.env, "CNI_PATH": self.cni_path}


def rail_conflist(k: int, family: str = "4", extra_route_tune_keys: dict | None = None, *,
                  data_dir: str | os.PathLike, cni_version: str = "1.0.0",
                  chained: str | None = "route-tune", ranges: list[list[dict]] | None = None,
                  device: str = "macvlan", ipam: str = "host-local") -> dict:
    """Rail k's chain: macvlan on `railK` with host-local IPAM, then `chained`.

    `device="host-device"` moves `railK` itself into the pod instead (the shape SR-IOV and RDMA
    exclusive mode give a pod: a netdev of the node, not a macvlan); `ipam="static"` gives each
    range's one address with its gateway instead of host-local.

    `ranges` (host-local's) default to the one-node lab's (`topology.rail_ranges`): pod gets
    .10 / ::10, gateway .254, and the range holds that one address (`one_address_ranges`).

    `chained=None` gives the bare macvlan list; `chained="sbr"` the differential variant.
    """
    if ranges is None:
        ranges = rail_ranges(k, family)
    if ipam == "static":
        ipam_conf: dict = {"type": "static", "addresses": [
            {"address": f"{r[0]['rangeStart']}/{r[0]['subnet'].split('/')[1]}", "gateway": r[0]["gateway"]}
            for r in ranges]}
    else:
        ipam_conf = {"type": "host-local", "dataDir": str(data_dir), "ranges": ranges}
    main = ({"type": "host-device", "device": f"rail{k}"} if device == "host-device"
            else {"type": "macvlan", "master": f"rail{k}", "mode": "bridge"})
    plugins: list[dict] = [{**main, "ipam": ipam_conf}]
    if chained:
        plugins.append({"type": chained, **(extra_route_tune_keys or {})})
    return {"cniVersion": cni_version, "name": f"rail{k}", "plugins": plugins}


def _failure_from(stdout: str, stderr: str) -> CniFailure:
    """Decode an error reply: the runner's one JSON line, or a plugin's (maybe pretty) JSON."""
    text = stdout.strip()
    err = None
    for candidate in (text, text.splitlines()[-1] if text else ""):
        try:
            err = json.loads(candidate)
            break
        except ValueError:
            continue
    if not isinstance(err, dict):
        return CniFailure(-1, text or stderr.strip(), stderr=stderr)
    return CniFailure(int(err.get("code", -1)), err.get("msg", ""), err.get("details", "") or "",
                      err.get("error", ""), stderr)


class Libcni:
    """libcni 1.1.2 through `cnirunner`, run inside the node namespace `node_ns`."""

    def __init__(self, node_ns: str, penv: PluginEnv, runner: Path | None = None) -> None:
        self.node_ns, self.penv = node_ns, penv
        self.runner = runner or build_cnirunner()
        self.conf_dir = penv.workdir / "conflists"
        self.conf_dir.mkdir(exist_ok=True)
        self.last_stderr = ""

    def _conflist_file(self, conflist: dict) -> Path:
        path = self.conf_dir / f"{conflist['name']}.conflist"
        path.write_text(json.dumps(conflist, indent=1))
        return path

    def call(self, command: str, conflist: dict, *, netns: str = "", ifname: str = "eth0",
             container_id: str = "lab", args: str = "", capargs: dict | None = None,
             valid: list[dict] | None = None) -> dict | None:
        """Run one runner command; the parsed result for `add`, None otherwise."""
        cmd = ["ip", "netns", "exec", self.node_ns, str(self.runner), command,
               "-conflist", str(self._conflist_file(conflist)), "-netns", netns, "-ifname", ifname,
               "-id", container_id, "-cache", str(self.penv.cache_dir), "-args", args]
        if capargs is not None:
            cmd += ["-capargs", json.dumps(capargs)]
        if valid is not None:
            cmd += ["-valid", json.dumps(valid)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.penv.process_env())
        self.last_stderr = proc.stderr
        if proc.returncode != 0:
            raise _failure_from(proc.stdout, proc.stderr)
        return json.loads(proc.stdout) if command == "add" else None

    def add(self, conflist: dict, **kw: Any) -> dict:
        return self.call("add", conflist, **kw)  # type: ignore[return-value]

    def check(self, conflist: dict, **kw: Any) -> None:
        self.call("check", conflist, **kw)

    def delete(self, conflist: dict, **kw: Any) -> None:
        self.call("del", conflist, **kw)

    def gc(self, conflist: dict, valid: list[dict]) -> None:
        self.call("gc", conflist, valid=valid)

    def status(self, conflist: dict) -> None:
        self.call("status", conflist)


def _version_at_least(version: str, minimum: str) -> bool:
    return tuple(int(x) for x in version.split(".")) >= tuple(int(x) for x in minimum.split("."))


class PyRuntime:
    """A Python stand-in for libcni 1.1.2's list operations (same cache file layout).

    Mimicked: `name`/`cniVersion` injected into every plugin config; `prevResult` = the
    previous plugin's result (ADD) or the cached final result (CHECK; DEL from 0.4.0);
    a result without `cniVersion` gets the config's; `runtimeConfig` = capability args the
    plugin declares in `capabilities`; DEL in reverse order, stopping at the first error;
    cache written after a full ADD and removed after a successful DEL; DEL without a cache
    sends no prevResult; CHECK below 0.4.0 or without a cache fails.  Not mimicked: Go's
    re-marshalling of results through typed structs (fields are passed on verbatim).
    """

    def __init__(self, node_ns: str, penv: PluginEnv) -> None:
        self.node_ns, self.penv = node_ns, penv

    def _cache_file(self, name: str, container_id: str, ifname: str) -> Path:
        return self.penv.cache_dir / "results" / f"{name}-{container_id}-{ifname}"

    def invoke(self, command: str, plugin: dict, conflist: dict, prev: dict | None, netns: str, ifname: str,
              container_id: str, args: str = "", capargs: dict | None = None) -> dict | None:
        """Run ONE plugin of `conflist` the way libcni would (used alone for e.g. a retried ADD)."""
        conf = {**plugin, "name": conflist["name"], "cniVersion": conflist["cniVersion"]}
        if prev is not None:
            conf["prevResult"] = prev
        runtime_config = {cap: (capargs or {})[cap] for cap, on in plugin.get("capabilities", {}).items()
                          if on and cap in (capargs or {})}
        if runtime_config:
            conf["runtimeConfig"] = runtime_config
        env = {**self.penv.process_env(), "CNI_COMMAND": command, "CNI_CONTAINERID": container_id,
               "CNI_NETNS": netns, "CNI_ARGS": args, "CNI_IFNAME": ifname}
        exe = next((Path(d) / plugin["type"] for d in self.penv.cni_path.split(":")
                    if (Path(d) / plugin["type"]).exists()), None)
        if exe is None:
            raise CniFailure(-1, f'failed to find plugin "{plugin["type"]}" in path {self.penv.cni_path}')
        proc = subprocess.run(["ip", "netns", "exec", self.node_ns, str(exe)], input=json.dumps(conf),
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise _failure_from(proc.stdout, proc.stderr)
        if command != "ADD":
            return None
        result = json.loads(proc.stdout)
        result.setdefault("cniVersion", conflist["cniVersion"])
        return result

    def add(self, conflist: dict, *, netns: str, ifname: str = "eth0", container_id: str = "lab",
            args: str = "", capargs: dict | None = None) -> dict:
        result = None
        for plugin in conflist["plugins"]:
            result = self.invoke("ADD", plugin, conflist, result, netns, ifname, container_id, args, capargs)
        cache = self._cache_file(conflist["name"], container_id, ifname)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({
            "kind": "cniCacheV1", "containerId": container_id, "ifName": ifname,
            "networkName": conflist["name"], "result": result,
            "config": base64.b64encode(json.dumps(conflist).encode()).decode(),
            **({"capabilityArgs": capargs} if capargs else {})}))
        return result  # type: ignore[return-value]

    def cached_result(self, conflist: dict, container_id: str, ifname: str) -> dict | None:
        cache = self._cache_file(conflist["name"], container_id, ifname)
        return json.loads(cache.read_text())["result"] if cache.exists() else None

    def check(self, conflist: dict, *, netns: str, ifname: str = "eth0", container_id: str = "lab",
              args: str = "", capargs: dict | None = None) -> None:
        if not _version_at_least(conflist["cniVersion"], "0.4.0"):
            raise CniFailure(-1, f'configuration version "{conflist["cniVersion"]}" does not support the CHECK command')
        prev = self.cached_result(conflist, container_id, ifname)
        if prev is None:
            raise CniFailure(-1, f'failed to get network "{conflist["name"]}" cached result')
        for plugin in conflist["plugins"]:
            self.invoke("CHECK", plugin, conflist, prev, netns, ifname, container_id, args, capargs)

    def delete(self, conflist: dict, *, netns: str = "", ifname: str = "eth0", container_id: str = "lab",
               args: str = "", capargs: dict | None = None) -> None:
        prev = (self.cached_result(conflist, container_id, ifname)
                if _version_at_least(conflist["cniVersion"], "0.4.0") else None)
        for plugin in reversed(conflist["plugins"]):
            self.invoke("DEL", plugin, conflist, prev, netns, ifname, container_id, args, capargs)
        self._cache_file(conflist["name"], container_id, ifname).unlink(missing_ok=True)


class RailHost(Protocol):
    """What `RailPod` needs of a lab: `OverlayLab`, or one node of a `fabric.FabricLab`."""

    node: str  # the node netns, where the runtime runs the plugins
    pod_netns: str  # CNI_NETNS
    rails: int
    family: str

    def rail_ranges(self, k: int) -> list[list[dict]]: ...


@dataclass
class RailPod:
    """The seed pod's rail chains on a lab: conflists, ADD/CHECK/DEL per rail, kept results.

    `keys` are route-tune keys for every rail, `per_rail[k]` extra keys for rail k; `device` and
    `ipam` choose the chain's first plugin and its IPAM (`rail_conflist`).
    """

    lab: RailHost
    penv: PluginEnv
    runtime: Libcni | PyRuntime
    keys: dict = field(default_factory=dict)
    per_rail: dict[int, dict] = field(default_factory=dict)
    cni_version: str = "1.0.0"
    chained: str | None = "route-tune"
    container_id: str = "lab-pod-1"
    results: dict[int, dict] = field(default_factory=dict)
    device: str = "macvlan"
    ipam: str = "host-local"

    @property
    def rails(self) -> range:
        return range(1, self.lab.rails + 1)

    def conflist(self, k: int) -> dict:
        return rail_conflist(k, self.lab.family, {**self.keys, **self.per_rail.get(k, {})},
                             data_dir=self.penv.ipam_dir, cni_version=self.cni_version, chained=self.chained,
                             ranges=self.lab.rail_ranges(k), device=self.device, ipam=self.ipam)

    def _kw(self, k: int, netns: str | None) -> dict:
        return {"netns": self.lab.pod_netns if netns is None else netns, "ifname": f"net{k}",
                "container_id": self.container_id}

    def add(self, k: int) -> dict:
        self.results[k] = self.runtime.add(self.conflist(k), **self._kw(k, None))
        return self.results[k]

    def check(self, k: int) -> None:
        self.runtime.check(self.conflist(k), **self._kw(k, None))

    def delete(self, k: int, netns: str | None = None) -> None:
        self.runtime.delete(self.conflist(k), **self._kw(k, netns))
        self.results.pop(k, None)

    def add_all(self) -> None:
        for k in self.rails:
            self.add(k)

    def delete_all(self, netns: str | None = None) -> None:
        for k in reversed(self.rails):
            self.delete(k, netns)

    def plugin_only(self, command: str, k: int, prev: dict | None = None, netns: str | None = None) -> dict | None:
        """Run route-tune (the chain's last plugin) alone for rail k, as libcni would call it."""
        conflist = self.conflist(k)
        return PyRuntime(self.lab.node, self.penv).invoke(
            command, conflist["plugins"][-1], conflist, prev, self.lab.pod_netns if netns is None else netns,
            f"net{k}", self.container_id)

    def retry_add(self, k: int) -> dict:
        """ADD route-tune alone again for rail k with the runtime's cached final result as prevResult
        (what a runtime retrying a half-finished chain sends; the macvlan step cannot be repeated)."""
        py = PyRuntime(self.lab.node, self.penv)
        conflist = self.conflist(k)
        prev = py.cached_result(conflist, self.container_id, f"net{k}")
        return py.invoke("ADD", conflist["plugins"][-1], conflist, prev, self.lab.pod_netns, f"net{k}",
                         self.container_id)  # type: ignore[return-value]
