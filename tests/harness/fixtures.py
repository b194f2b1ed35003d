"""The harness's pytest fixtures (registered by ``tests/conftest.py``).

- ``engine``: the engine mode, parametrised ``inprocess`` / ``resident``; pin one in a test with
  ``@pytest.mark.parametrize("engine", ["inprocess"], indirect=True)``.
- ``overlay_lab(family="4", rails=8, kind=OverlayLab)``: factory of built labs (any variant of
  ``harness.lab``), named by ``harness.lab.NAMES``, closed at teardown even when the test fails.
- ``plugin_env(family="4", name="penv", **defaults)``: a ``PluginEnv`` in ``engine`` mode; in
  resident mode with a ``Resident`` server in a netns of its own.
- ``libcni``: the built Go runner binary (built once per session, offline).
- ``rail_pod(family="4", rails=8, **RailPod kw)``: a fresh lab's ``RailPod`` through libcni.
- ``make_rig(family="4", rails=2, lab_class=OverlayLab, **defaults)``: a ``harness.plugin.Rig``.
- ``netns_group(cls, **fields)``: a built ``harness.topologies.NetnsGroup`` topology of the kernel
  suites (tag from ``NAMES``, ``tmp`` the test's tmp_path), cleaned up at teardown.
- ``calico_rails(rails=3, v4=True, v6=False)``, ``underlay_factory(v4=True, v6=False, rails=1)``,
  ``fabric(layout, rails, families)``: built ``harness.topologies`` of the kernel suites.
- ``cni_env``: an ADD's environment needing no namespace (``harness.plugin.request_env``: node
  defaults with a log dir and a state dir in tmp).
- ``make_netns(role="ns", lines=(), lines6=())``: an empty throwaway netns (lo up, no DAD, then
  ``ip -batch`` ``lines`` and ``ip -6 -batch`` ``lines6``), named by ``NAMES``; returns its name.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator

import pytest

from cniplugin.lab.runtime import Libcni, PluginEnv, RailPod, build_cnirunner
from cniplugin.lab.topology import OverlayLab
from harness.host import require
from harness.lab import NAMES, lab_session, scratch_netns
from harness.plugin import Rig, request_env
from harness.resident import Resident
from harness.topologies import CalicoRails, Fabric, NetnsGroup, Underlay

ENGINES = ("inprocess", "resident")

__all__ = ["ENGINES", "calico_rails", "cni_env", "engine", "fabric", "lab_session", "libcni", "make_netns",
           "make_rig", "netns_group", "overlay_lab", "plugin_env", "rail_pod", "underlay_factory"]


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def overlay_lab(lab_session: None) -> Iterator[Callable[..., OverlayLab]]:
    labs: list[OverlayLab] = []

    def make(family: str = "4", rails: int = 8, kind: type[OverlayLab] = OverlayLab) -> OverlayLab:
        lab = kind(NAMES.next(), rails=rails, family=family)
        lab.__enter__()
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            lab.close()


@pytest.fixture(scope="session")
def libcni() -> str:
    """Path of the Go libcni runner (built offline in GOPATH mode once)."""
    require("" if shutil.which("go") else
            "needs Go and golang-github-appc-cni-dev to build the libcni runner")
    return str(build_cnirunner())


@pytest.fixture
def plugin_env(tmp_path, engine: str, lab_session: None) -> Iterator[Callable[..., PluginEnv]]:
    stack = contextlib.ExitStack()

    def make(family: str = "4", name: str = "penv", **defaults: object) -> PluginEnv:
        penv = PluginEnv(tmp_path / name, family=family, defaults=dict(defaults),
                         env={"ROUTE_TUNE_ENGINE": engine})
        if engine == "resident":
            server = stack.enter_context(Resident(f"{NAMES.next()}-srv", penv, own_netns=True))
            penv.env.update(server.env)
        return penv

    with stack:
        yield make


@pytest.fixture
def rail_pod(overlay_lab, plugin_env, libcni) -> Callable[..., RailPod]:
    def make(family: str = "4", rails: int = 8, defaults: dict | None = None, **kw: object) -> RailPod:
        lab = overlay_lab(family, rails)
        penv = plugin_env(family, name=lab.prefix, **(defaults or {}))
        return RailPod(lab, penv, Libcni(lab.node, penv, libcni), **kw)  # type: ignore[arg-type]

    return make


@pytest.fixture
def make_rig(lab_session: None, engine: str) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(family: str = "4", rails: int = 2, lab_class: type = OverlayLab, **defaults: object) -> Rig:
        lab = lab_class(NAMES.next(), rails=rails, family=family).__enter__()
        try:
            rig = Rig(lab, engine, dict(defaults))
        except BaseException:
            lab.close()
            raise
        rigs.append(rig)
        return rig

    try:
        yield make
    finally:
        errors = []
        for rig in rigs:
            try:
                rig.close()
            except AssertionError as exc:
                errors.append(str(exc))
        assert not errors, "\n".join(errors)


@pytest.fixture
def make_netns(lab_session: None) -> Iterator[Callable[..., str]]:
    with contextlib.ExitStack() as stack:
        def make(role: str = "ns", lines: tuple[str, ...] | list[str] = (),
                 lines6: tuple[str, ...] | list[str] = ()) -> str:
            return stack.enter_context(scratch_netns(role, lines, lines6))
        yield make


@pytest.fixture
def netns_group(tmp_path, lab_session: None) -> Iterator[Callable[..., NetnsGroup]]:
    made: list[NetnsGroup] = []

    def make(cls: type[NetnsGroup], **fields: object) -> NetnsGroup:
        group = cls(tag=NAMES.next(), tmp=str(tmp_path), **fields)  # type: ignore[call-arg]
        made.append(group)
        group.build()  # type: ignore[attr-defined]
        return group

    try:
        yield make
    finally:
        for group in made:
            group.cleanup()


@pytest.fixture
def cni_env(tmp_path) -> dict[str, str]:
    """An ADD's environment that needs no namespace (``request_env``: node defaults in tmp)."""
    return request_env(tmp_path)


@pytest.fixture
def calico_rails(netns_group) -> Callable[..., CalicoRails]:
    def make(rails: int = 3, v4: bool = True, v6: bool = False) -> CalicoRails:
        return netns_group(CalicoRails, rails=rails, v4=v4, v6=v6)
    return make


@pytest.fixture
def underlay_factory(netns_group) -> Callable[..., Underlay]:
    def make(v4: bool = True, v6: bool = False, rails: int = 1) -> Underlay:
        return netns_group(Underlay, v4=v4, v6=v6, rails=rails)
    return make


@pytest.fixture
def fabric(netns_group) -> Callable[..., Fabric]:
    def make(layout: str, rails: int, families: tuple[int, ...]) -> Fabric:
        return netns_group(Fabric, layout=layout, rails=rails, families=families)
    return make
