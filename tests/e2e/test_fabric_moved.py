"""Rails as netdevs moved into the pod (the SR-IOV / RDMA exclusive shape) on the two-node lab,
and ``cni-route-tune reach`` there, its whole output compared.

Each node's ``railK`` is one end of a veth pair whose other end is a port of leaf K's bridge: the
"VF". ``[host-device + static, route-tune]`` moves it into the pod as netK through libcni; its
DEL moves it back after route-tune's DEL has restored what route-tune changed. Unused VFs sit
down in the node, as host-device leaves them after a DEL, so the node's whole state before the
first ADD is the state every DEL must give back.

One lab for the module (dual stack, 8 rails, overlay); the tests run in file order and the last
one deletes and re-adds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from cniplugin.lab.fabric import FabricLab, FabricPods
from cniplugin.lab.flows import run_flows
from cniplugin.lab.topology import ip_batch, state_diff
from harness.cli import Run, cli
from harness.fabric import FabricRig, assert_rail_del_exact
from harness.golden import assert_golden, mask_rtt, normalise
from harness.host import require
from harness.lab import NAMES
from harness.snapshot import only_dev, rules_sorted, without_dev

pytestmark = pytest.mark.usefixtures("lab_session")

TXQLEN = 4321
#: route-tune keys on every rail: podMACPrefix must leave a moved netdev's MAC alone.
KEYS = {"txQueueLen": TXQLEN, "podMACPrefix": "0a:1b"}


class Moved(FabricRig):
    """The module's lab (the fabric suites' rig), each VF's MAC in the node before any ADD."""

    def __init__(self, lab: FabricLab, pods: FabricPods) -> None:
        super().__init__(lab, pods)
        self.before_add = self.states()
        self.vf_macs = {(i, k): self.link(lab.node(i), f"rail{k}")["address"]
                        for i in lab.node_ids for k in lab.rail_ids}

    def link(self, ns: str, name: str) -> dict:
        return json.loads(self.lab.ip(ns, "-j", "-d", "link", "show", name))[0]

    def reach(self, i: int, *args: str) -> Run:
        """``reach`` from pod i, run in node i as an operator would."""
        return cli("reach", *args, "--netns", self.lab.pod(i), "--timeout", "2s",
                   defaults=self.pods.penvs[i].defaults_file, inside=self.lab.node(i))

    def golden(self, run: Run, name: str) -> None:
        assert_golden(normalise(f"{mask_rtt(run.out)}[exit {run.code}]\n", NAMES.prefix), f"cli/{name}.txt")


@pytest.fixture(scope="module")
def moved(libcni: str) -> Iterator[Moved]:
    require("" if os.path.exists("/usr/lib/cni/host-device") else
            "needs containernetworking-plugins (/usr/lib/cni/host-device)")
    with FabricLab(NAMES.next(), nodes=2, rails=8, family="dual") as lab:
        for i in lab.node_ids:
            ip_batch([f"link set rail{k} down" for k in lab.rail_ids], lab.node(i))
        pods = FabricPods(lab, runner=libcni, device="host-device", ipam="static", keys=KEYS)  # type: ignore[arg-type]
        state = Moved(lab, pods)
        pods.add_all()
        yield state


def _paths_on_own_rail(run: Run) -> None:
    """Every bound path left by its own rail and its reply came back on it."""
    assert run.code == 0, run.out + run.err
    for path in run.json()["paths"]:
        if path["bound"]:
            assert (path["dev"], path["reply_dev"]) == (path["rail"], path["rail"]), path


def test_every_rail_carries_its_own_stream_both_ways(moved: Moved):
    moved.assert_streams_on_own_rails()


def test_different_rails_bound_and_unbound(moved: Moved):
    """A net1 -> B net2: bound to net1's address, out and back on A's net1 (routed by the
    leaves and the spine); unbound, A's net2 (the connected subnet) both ways."""
    for fam in moved.lab.families:
        paths = run_flows([moved.rail_flow(1, fam, 2), moved.rail_flow(1, fam, 2, bound=False)])
        assert [p.ok and p.only(dev, "net2") for p, dev in zip(paths, ("net1", "net2"))] == [True, True], \
            [(p.flow, p.error, p.ifaces()) for p in paths]


def test_reach_every_rail_both_ways(moved: Moved):
    """reach from pod 1 to pod 2's net1 (the whole table), and per rail both ways."""
    lab = moved.lab
    moved.golden(moved.reach(1, lab.rail_ip(2, 1, "4")), "reach_same_rail")
    for i, j in ((1, 2), (2, 1)):
        for fam in lab.families:
            _paths_on_own_rail(moved.reach(i, lab.rail_ip(j, 1, fam), "--json"))


def test_reach_other_rail_is_routed_by_the_bound_source(moved: Moved):
    """net1's source to pod 2's net2 leaves by net1 via leaf 1's gateway and the spine, and
    the reply comes back on net1; unbound, the kernel picks net2 (the connected subnet)."""
    lab = moved.lab
    moved.golden(moved.reach(1, lab.rail_ip(2, 2, "6"), "--ifname", "net1", "--json"),
                 "reach_other_rail_json")


def test_reach_cluster_service_stays_on_eth0(moved: Moved):
    """The service range from every rail's source: eth0, whatever the source."""
    moved.golden(moved.reach(1, moved.lab.service_ip("4")), "reach_service")


def test_reach_usage_and_missing_netns(moved: Moved):
    """A peer that is no address and an interface the pod lacks: usage errors (exit 2); a netns
    that does not exist: exit 3. Nothing on stdout, the whole message on stderr."""
    runs = {"reach_not_an_ip": (moved.reach(1, "not-an-ip"), 2),
            "reach_no_such_ifname": (moved.reach(1, "10.0.0.1", "--ifname", "net9"), 2),
            "reach_not_found": (cli("reach", "10.0.0.1", "--netns", f"{NAMES.prefix}-none"), 3)}
    for name, (run, code) in runs.items():
        assert (run.code, run.out) == (code, ""), (name, run.code, run.out, run.err)
        assert_golden(normalise(run.err, NAMES.prefix), f"cli/{name}.txt")


def test_moved_netdev_keeps_its_mac_and_takes_txqueuelen(moved: Moved):
    """podMACPrefix leaves the VF's MAC alone; txQueueLen applies; the result names the MAC."""
    lab = moved.lab
    for i in lab.node_ids:
        for k in lab.rail_ids:
            link = moved.link(lab.pod(i), f"net{k}")
            assert (link["address"], link["txqlen"], link.get("ifalias")) == (
                moved.vf_macs[(i, k)], TXQLEN, f"rail{k}")
            result = moved.pods[i].results[k]
            assert result["interfaces"] == [{"name": f"net{k}", "mac": moved.vf_macs[(i, k)],
                                             "sandbox": lab.pod_netns(i)}], result


def test_del_returns_the_device_and_readd_restores_the_matrix(moved: Moved):
    """DEL of pod 1's rail 3: the VF is back in node 1 as it was before any ADD (MAC,
    txqueuelen, sysctls), node 1 otherwise lost exactly net3's entries, pod 2 and node 2 are
    untouched, pod 1's other rails carry their streams; a re-ADD restores the whole state and
    the matrix."""
    lab, pods, k = moved.lab, moved.pods, 3
    full = moved.states()
    pods[1].delete(k)
    after = moved.states()
    assert_rail_del_exact(lab, full, after, k, node1=lambda state: without_dev(state, f"rail{k}"))
    node1 = lab.node(1)
    assert state_diff(only_dev(after[node1], f"rail{k}"),
                      only_dev(moved.before_add[node1], f"rail{k}")) == ""
    moved.assert_streams_on_own_rails(r for r in lab.rail_ids if r != k)
    pods[1].add(k)
    again = moved.states()
    for ns in full:
        assert state_diff(rules_sorted(full[ns]), rules_sorted(again[ns])) == "", ns
    moved.assert_streams_on_own_rails()


def test_del_of_everything_gives_both_nodes_back(moved: Moved):
    """Last: DEL every rail on both nodes: every VF back, both nodes and pods as before ADD."""
    moved.pods.delete_rails()
    now = moved.states()
    for ns, state in moved.before_add.items():
        assert state_diff(state, now[ns]) == "", ns

