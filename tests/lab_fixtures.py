"""Shared pytest fixtures for suites that need the namespace lab and a real CNI runtime.

Import what you need in a test module (or a conftest):

    from lab_fixtures import overlay_lab, plugin_env, libcni, rail_pod, require_root  # noqa: F401

- `overlay_lab(family="4", rails=8)`: factory; each lab gets a unique `rtC<n>` prefix and is
  torn down after the test even when it fails.  Leftovers of crashed sessions (prefix `rtC`,
  owner pid gone) are removed once per session; live labs of parallel sessions are kept.
- `plugin_env`: a `PluginEnv` (private CNI_PATH, node defaults, state/log dirs), parametrised
  over `ENGINE_MODES`.  To add an engine mode, register a context manager factory:
  `ENGINE_MODES["resident"] = start_resident` where `start_resident(penv)` starts the server
  with its socket under `penv.workdir`, sets `penv.env["ROUTE_TUNE_SOCKET"]`, yields, stops it.
- `libcni`: the built Go runner binary (built once per session, offline).
- `rail_pod(lab, **kw)`: factory of `RailPod` on a lab, through libcni.
Root-needing fixtures fail (not skip) when env CI is set.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from typing import ContextManager

import conftest
import pytest

from cniplugin.lab.runtime import Libcni, PluginEnv, RailPod, ResidentEngine, build_cnirunner
from cniplugin.lab.sessions import LabNames
from cniplugin.lab.topology import OverlayLab, cleanup

PREFIX = "rtC"
#: This session's lab names: rtC<pid base36>x<n>.  Other sessions (other suites importing these
#: fixtures) run at the same time, so only labs of dead owners are removed.
NAMES = LabNames(PREFIX)
SESSION_PREFIX = NAMES.prefix


@contextlib.contextmanager
def _inprocess(penv: PluginEnv) -> Iterator[None]:
    """The default engine mode: every plugin process runs the engine itself."""
    yield


@contextlib.contextmanager
def _resident(penv: PluginEnv) -> Iterator[None]:
    """Every plugin process forwards to one `cni-route-tune serve` (no in-process fallback)."""
    with ResidentEngine(penv.workdir / "engine", f"{NAMES.next()}-srv") as engine:
        penv.env.update(engine.env)
        yield


#: Engine modes the plugin-env fixture runs under (ROUTE_TUNE_ENGINE=<mode>).
ENGINE_MODES: dict[str, Callable[[PluginEnv], ContextManager[None]]] = {
    "inprocess": _inprocess, "resident": _resident}


def require_root() -> None:
    """Skip (or fail under CI) when namespaces cannot be created here."""
    conftest.require_root("ip")


@pytest.fixture(scope="session")
def _lab_session_cleanup() -> Iterator[None]:
    require_root()
    NAMES.cleanup_stale()
    yield
    cleanup(SESSION_PREFIX)


@pytest.fixture
def overlay_lab(_lab_session_cleanup: None) -> Iterator[Callable[..., OverlayLab]]:
    """Factory: `overlay_lab(family="4", rails=8)` → a built OverlayLab, closed at teardown."""
    labs: list[OverlayLab] = []

    def make(family: str = "4", rails: int = 8) -> OverlayLab:
        lab = OverlayLab(NAMES.next(), rails=rails, family=family)
        labs.append(lab)
        return lab.__enter__()

    try:
        yield make
    finally:
        for lab in labs:
            lab.close()


@pytest.fixture(scope="session")
def libcni() -> str:
    """Path of the Go libcni runner (built offline in GOPATH mode once)."""
    if not shutil.which("go"):
        msg = "needs Go and golang-github-appc-cni-dev to build the libcni runner"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return str(build_cnirunner())


@pytest.fixture(params=list(ENGINE_MODES))
def engine_mode(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def plugin_env(tmp_path, engine_mode: str) -> Iterator[Callable[..., PluginEnv]]:
    """Factory: `plugin_env(family="4", **defaults)` → a PluginEnv with ROUTE_TUNE_ENGINE set."""
    stack = contextlib.ExitStack()

    def make(family: str = "4", name: str = "penv", **defaults: object) -> PluginEnv:
        penv = PluginEnv(tmp_path / name, family=family, defaults=dict(defaults),
                         env={"ROUTE_TUNE_ENGINE": engine_mode})
        stack.enter_context(ENGINE_MODES[engine_mode](penv))
        return penv

    with stack:
        yield make


@pytest.fixture
def rail_pod(overlay_lab, plugin_env, libcni) -> Callable[..., RailPod]:
    """Factory: `rail_pod(family="4", rails=8, **RailPod kwargs)` → (a fresh lab's) RailPod via libcni."""
    def make(family: str = "4", rails: int = 8, defaults: dict | None = None, **kw: object) -> RailPod:
        lab = overlay_lab(family, rails)
        penv = plugin_env(family, name=lab.prefix, **(defaults or {}))
        return RailPod(lab, penv, Libcni(lab.node, penv, libcni), **kw)  # type: ignore[arg-type]

    return make


# -- behaviour assertions shared by the end-to-end suites ------------------------------

def external(fam: str) -> str:
    """A destination only a default route reaches."""
    return "192.0.2.1" if fam == "4" else "2001:db8::1"


def cluster_dests(lab: OverlayLab, fam: str) -> list[str]:
    """One address in each cluster CIDR of the node defaults, plus the node's own IP."""
    if fam == "4":
        return ["10.233.0.10", "10.233.64.7", "169.254.20.1", lab.node_ip("4")]
    return ["fd00:10:96::a", "fd00:10:233::7", lab.node_ip("6")]


def assert_rail_routing(pod: RailPod, rails: list[int] | None = None, default_nic: str = "eth0") -> None:
    """Outcomes 1-4 and 6 of issue 3 for `rails` (default: all), by `ip route get` and pings."""
    lab = pod.lab
    rails = list(pod.rails) if rails is None else rails
    problems: list[str] = []
    pairs: list[tuple[str, str]] = []
    for fam in lab.families:
        sources = [lab.pod_ip(fam)] + [lab.rail_ip(k, fam) for k in rails]
        for k in rails:
            src, gw = lab.rail_ip(k, fam), lab.gw_ip(k, fam)
            got = lab.route_get(lab.pod, lab.behind_ip(k, fam), src)
            if (got.get("dev"), got.get("gateway")) != (f"net{k}", gw):
                problems.append(f"from {src} to {lab.behind_ip(k, fam)}: want net{k} via {gw}, got {got}")
            got = lab.route_get(lab.pod, gw, src)
            if got.get("dev") != f"net{k}" or got.get("gateway"):
                problems.append(f"from {src} to {gw}: want direct on net{k}, got {got}")
            pairs += [(src, gw), (src, lab.behind_ip(k, fam))]
        for dst in cluster_dests(lab, fam):
            for src in sources + [None]:
                got = lab.route_get(lab.pod, dst, src)
                if got.get("dev") != "eth0":
                    problems.append(f"cluster {dst} from {src or 'no source'}: want eth0, got {got}")
        got = lab.route_get(lab.pod, external(fam))
        if got.get("dev") != default_nic:
            problems.append(f"default (no source) to {external(fam)}: want {default_nic}, got {got}")
        got = lab.route_get(lab.pod, external(fam), lab.pod_ip(fam))
        if got.get("dev") != "eth0":
            problems.append(f"reply from eth0 {lab.pod_ip(fam)}: want eth0 (table 100), got {got}")
    for ping in lab.ping_many(lab.pod, pairs):
        if not ping["ok"]:
            problems.append(f"pod ping {ping['src']} -> {ping['dst']}: {ping['error']}")
    node_pairs = [("", lab.rail_ip(k, fam)) for k in rails for fam in lab.families]
    for ping in lab.ping_many(lab.node, node_pairs):
        if not ping["ok"]:
            problems.append(f"node ping -> {ping['dst']}: {ping['error']}")
    assert not problems, "\n".join(problems)


def pod_rules(lab: OverlayLab) -> list[dict]:
    """The pod's non-default rules of both families (`ip -j rule`)."""
    rules = []
    for fam in lab.families:
        rules += [r for r in json.loads(lab.ip(lab.pod, "-j", f"-{fam}", "rule", "show"))
                  if r.get("table") not in ("local", "main", "default")]
    return rules


__all__ = ["ENGINE_MODES", "_lab_session_cleanup", "assert_rail_routing", "cluster_dests", "engine_mode",
           "external", "libcni", "overlay_lab", "plugin_env", "pod_rules", "rail_pod", "require_root"]
