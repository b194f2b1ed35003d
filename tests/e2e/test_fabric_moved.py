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
import re
from collections.abc import Iterator

import pytest

from cniplugin.lab.fabric import FabricLab, FabricPods
from cniplugin.lab.topology import ip_batch, namespace_state, state_diff
from harness.cli import Run, cli
from harness.golden import assert_golden, normalise
from harness.host import require
from harness.lab import NAMES

pytestmark = pytest.mark.usefixtures("lab_session")

TXQLEN = 4321
#: route-tune keys on every rail: podMACPrefix must leave a moved netdev's MAC alone.
KEYS = {"txQueueLen": TXQLEN, "podMACPrefix": "0a:1b"}
_RTT_TEXT = re.compile(r" +\d+\.\d{3} ms")
_RTT_JSON = re.compile(r'"rtt_ms": [0-9.]+')


class Moved:
    """The module's lab: the fabric, its pods, and each node's state before any ADD."""

    def __init__(self, lab: FabricLab, pods: FabricPods) -> None:
        self.lab, self.pods = lab, pods
        self.before = {i: namespace_state(lab.node(i)) for i in lab.node_ids}
        self.vf_macs = {(i, k): self.link(lab.node(i), f"rail{k}")["address"]
                        for i in lab.node_ids for k in lab.rail_ids}

    def link(self, ns: str, name: str) -> dict:
        return json.loads(self.lab.ip(ns, "-j", "-d", "link", "show", name))[0]

    def reach(self, i: int, *args: str) -> Run:
        """``reach`` from pod i, run in node i as an operator would."""
        return cli("reach", *args, "--netns", self.lab.pod(i), "--timeout", "2s",
                   defaults=self.pods.penvs[i].defaults_file, inside=self.lab.node(i))

    def golden(self, run: Run, name: str) -> None:
        text = _RTT_JSON.sub('"rtt_ms": "<rtt>"', _RTT_TEXT.sub(" <rtt>", run.out))
        assert_golden(normalise(f"{text}[exit {run.code}]\n", NAMES.prefix), f"cli/{name}.txt")


@pytest.fixture(scope="module")
def moved() -> Iterator[Moved]:
    require("" if os.path.exists("/usr/lib/cni/host-device") else
            "needs containernetworking-plugins (/usr/lib/cni/host-device)")
    with FabricLab(NAMES.next(), nodes=2, rails=8, family="dual") as lab:
        for i in lab.node_ids:
            ip_batch([f"link set rail{k} down" for k in lab.rail_ids], lab.node(i))
        pods = FabricPods(lab, device="host-device", ipam="static", keys=KEYS)
        state = Moved(lab, pods)
        pods.add_all()
        yield state


def _paths_on_own_rail(run: Run) -> None:
    """Every bound path left by its own rail and its reply came back on it."""
    assert run.code == 0, run.out + run.err
    for path in run.json()["paths"]:
        if path["bound"]:
            assert (path["dev"], path["reply_dev"]) == (path["rail"], path["rail"]), path


def test_reach_every_rail_both_ways(moved: Moved):
    """Pod 1 to pod 2's netK from every rail, and back, both families: the whole table."""
    lab = moved.lab
    moved.golden(moved.reach(1, lab.rail_ip(2, 1, "4")), "reach_same_rail")
    for i, j in ((1, 2), (2, 1)):
        for k in lab.rail_ids:
            for fam in lab.families:
                run = moved.reach(i, lab.rail_ip(j, k, fam), "--ifname", f"net{k}", "--json")
                _paths_on_own_rail(run)
                assert run.json()["paths"][0]["gateway"] == ""  # same rail: switched, no hop


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
    assert moved.reach(1, "not-an-ip").code == 2
    assert moved.reach(1, "10.0.0.1", "--ifname", "net9").code == 2
    gone = cli("reach", "10.0.0.1", "--netns", f"{NAMES.prefix}-none")
    assert gone.code == 3, gone.err


def test_moved_netdev_keeps_its_mac_and_takes_txqueuelen(moved: Moved):
    """podMACPrefix leaves the VF's MAC alone; txQueueLen applies; the result names the MAC."""
    lab = moved.lab
    for i in lab.node_ids:
        for k in lab.rail_ids:
            link = moved.link(lab.pod(i), f"net{k}")
            assert (link["address"], link["txqlen"], link.get("ifalias")) == (
                moved.vf_macs[(i, k)], TXQLEN, f"rail{k}")
            result = moved.pods[i].results[k]
            assert result["interfaces"][0]["mac"] == moved.vf_macs[(i, k)]


def test_del_returns_the_device_and_readd_restores_the_matrix(moved: Moved):
    """DEL of pod 1's rail 3: the VF is back in node 1 as it was, pod 2 and pod 1's other rails
    are untouched; a re-ADD restores the matrix; DEL of everything gives both nodes back."""
    lab, pods = moved.lab, moved.pods
    pod2_before = namespace_state(lab.pod(2))
    pods[1].delete(3)
    vf = moved.link(lab.node(1), "rail3")
    assert (vf["address"], vf["txqlen"], vf["operstate"]) == (moved.vf_macs[(1, 3)], 1000, "DOWN")
    assert "net3" not in lab.ip(lab.pod(1), "-br", "link")
    assert state_diff(pod2_before, namespace_state(lab.pod(2))) == ""
    run = moved.reach(1, lab.rail_ip(2, 4, "4"))
    assert run.code == 0 and "net3" not in run.out, run.out
    pods[1].add(3)
    for fam in lab.families:
        _paths_on_own_rail(moved.reach(1, lab.rail_ip(2, 3, fam), "--ifname", "net3", "--json"))
        _paths_on_own_rail(moved.reach(2, lab.rail_ip(1, 3, fam), "--ifname", "net3", "--json"))
    pods.delete_rails()
    for i in lab.node_ids:
        assert state_diff(moved.before[i], namespace_state(lab.node(i))) == ""
