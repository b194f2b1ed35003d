"""The two-node fabric suites' harness: a module-scoped lab with its pods set up through libcni
(``fabric_rig``), whole-state snapshots of both nodes and pods, and the cross-node flows (every
rail's own stream: ``assert_streams_on_own_rails``). The ARP probe is ``harness.kernel``'s.

``fabric_rig`` is parametrised over ``CASES`` (mode, layout, family); pytest groups a module's
tests by case, so each case builds its lab once. Tests that change the lab (DEL, re-ADD) leave
it as they found it; the module's last test DELs everything and compares with the pre-ADD state.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pytest

from cniplugin.lab.fabric import FabricLab, FabricPods
from cniplugin.lab.flows import Flow, run_flows
from cniplugin.lab.topology import netns_names, state_diff
from harness.lab import NAMES
from harness.snapshot import ns_state, without_addrs

#: (mode, layout, family): overlay and underlay, IPv4 and dual stack, separate subnets and one
#: shared subnet; the dual-stack cases cover IPv4 too, so IPv4 alone runs once per mode.
CASES = [("overlay", "separate", "4"), ("overlay", "separate", "dual"), ("overlay", "shared", "dual"),
         ("underlay", "separate", "dual"), ("underlay", "shared", "4")]


@dataclass
class FabricRig:
    """A built `FabricLab` with its `FabricPods` (rails ADDed) and the pre-ADD state."""

    lab: FabricLab
    pods: FabricPods
    before_add: dict = field(default_factory=dict)
    _ports: Iterator[int] = field(default_factory=lambda: itertools.count(20000))

    @property
    def a(self) -> str:
        return self.lab.pod(1)

    @property
    def b(self) -> str:
        return self.lab.pod(2)

    def port(self) -> int:
        """A server port no earlier flow of this lab used (no TIME_WAIT leftovers in the counts)."""
        return next(self._ports)

    def states(self) -> dict:
        """Whole state (rules, routes, links, addresses, neighbours, sysctls, nft) of both nodes
        and both pods."""
        names = [self.lab.node(i) for i in self.lab.node_ids] + [self.lab.pod(i) for i in self.lab.node_ids]
        return {ns: ns_state(ns) for ns in names if ns in netns_names(self.lab.prefix)}

    def rail_flow(self, k: int, fam: str, j: int | None = None, bound: bool = True) -> Flow:
        """Pod A netK (bound, or the kernel's choice) to pod B netJ (default: the same rail)."""
        j = k if j is None else j
        return Flow(self.a, self.b, self.lab.rail_ip(1, k, fam) if bound else "",
                    self.lab.rail_ip(2, j, fam), self.port())

    def assert_streams_on_own_rails(self, rails: Iterable[int] | None = None) -> None:
        """A netK -> B netK for every K in ``rails`` (default: all) and every family at once, a
        2 MiB echo each: every stream left and arrived on netK in both pods, replies included,
        and on no other interface."""
        rails = self.lab.rail_ids if rails is None else list(rails)
        flows = {(k, fam): self.rail_flow(k, fam) for fam in self.lab.families for k in rails}
        paths = run_flows(list(flows.values()))
        bad = [p for (k, _), p in zip(flows, paths) if not (p.ok and p.only(f"net{k}", f"net{k}"))]
        assert not bad, "\n".join(f"{p.flow.src} -> {p.flow.dst}: ok={p.ok} {p.error} local={p.local} "
                                  f"(A out, B in, B out, A in) {p.ifaces()}" for p in bad)

    def cluster_dev(self) -> str:
        """Where the pod's cluster traffic leaves: Calico's eth0, or the underlay's veth0."""
        return "eth0" if self.lab.mode == "overlay" else "veth0"


def assert_rail_del_exact(lab, full: dict, after: dict, k: int, *, node1=lambda state: state) -> None:
    """After a DEL of pod 1's rail ``k`` (``full``/``after``: whole states by namespace): pod 2
    and node 2 are unchanged, and node 1 (``node1(after)``: the part to compare) is exactly as
    before minus every entry naming net``k``'s addresses, of which there was one at least."""
    for ns in (lab.pod(2), lab.node(2)):
        assert state_diff(full[ns], after[ns]) == "", ns
    node, addrs = lab.node(1), {lab.rail_ip(1, k, fam) for fam in lab.families}
    want = without_addrs(full[node], addrs)
    assert want != full[node], f"node 1 had no entry naming net{k}'s addresses {addrs}"
    assert state_diff(want, node1(after[node])) == "", \
        f"node 1 is not exactly as before minus net{k}'s entries"


def case_id(case: tuple[str, str, str]) -> str:
    mode, layout, family = case
    return f"{mode}-{layout}-{'v4' if family == '4' else family}"


@pytest.fixture(scope="module", params=CASES, ids=case_id)
def fabric_rig(request: pytest.FixtureRequest, lab_session: None, libcni: str) -> Iterator[FabricRig]:
    mode, layout, family = request.param
    with FabricLab(NAMES.next(), family=family, mode=mode, layout=layout) as lab:
        pods = FabricPods(lab, runner=libcni)  # type: ignore[arg-type]
        before = {ns: ns_state(ns) for ns in [lab.node(i) for i in lab.node_ids]}
        pods.setup_eth0()
        rig = FabricRig(lab, pods)
        rig.before_add = {"nodes": before, "rails": rig.states()}
        pods.add_rails()
        yield rig

