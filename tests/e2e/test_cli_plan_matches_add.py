"""``cni-route-tune plan`` is what ADD installs, in every mode (issue 12 item 3).

For each interface: ``facts`` (the engine's one gatherer) -> ``plan --facts`` -> the real ADD,
then the whole planned object set is compared with the whole set read back from the kernel:
every protocol-231 rule, route and neighbour in the pod and on the node (installed = before |
planned, nothing more, nothing less), and every sysctl, link attribute, veth and nft table of
the plan as the kernel now reports it. Overlay (v4, dual stack) runs in the namespace lab;
underlay (v4, dual stack) in the harness's ``Underlay`` topology, whose net1 plan needs the underlay veth's
host peer (``rt<container id>``) that eth0's ADD created.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cniplugin.records.objects import Desired, LinkAttr, NftTable, Sysctl, Veth
from cniplugin.engine.gather import sessions_bound_to
from cniplugin.kernel import netns as _netns
from harness.cli import CID, cli, make_pod, require_lab
from harness.snapshot import owned_objects
from harness.topologies import UNDERLAY_CID

pytestmark = pytest.mark.netns


def _listed(objects) -> set[str]:
    """The rules, routes and neighbours of a plan (what ``owned_objects`` reads back)."""
    return {o.render() for o in objects
            if not isinstance(o, (Sysctl, LinkAttr, Veth, NftTable))}


def _read_back(pod_netns: str, node_netns: str, desired: Desired) -> dict[str, object]:
    """Each sysctl, link attribute, veth and nft table of a plan, as the kernel has it now
    (through one session per netns, as the engine reads them: a veth has an end on each)."""
    def read(nl, objects):
        return {o.render(): (nl.read_attr(o) if isinstance(o, (Sysctl, LinkAttr)) else nl.read(o))
                for o in objects if isinstance(o, (Sysctl, LinkAttr, Veth, NftTable))}
    pod_fd, node_fd = _netns.open_netns(pod_netns), _netns.open_netns(node_netns)
    try:
        with sessions_bound_to(pod_fd, node_fd) as (pod_nl, node_nl):
            return {**read(pod_nl, desired.pod_objects()), **read(node_nl, desired.node_objects())}
    finally:
        os.close(pod_fd)
        os.close(node_fd)


def _expected(objects) -> dict[str, object]:
    return {o.render(): (o.value if isinstance(o, (Sysctl, LinkAttr)) else o)
            for o in objects if isinstance(o, (Sysctl, LinkAttr, Veth, NftTable))}


def plan_then_add(workdir: Path, defaults: Path, pod_netns: str, node_netns: str, ifname: str,
                  container_id: str, conf: dict, prev: dict, add) -> Desired:
    """facts -> plan -> ADD for ``ifname``; asserts ADD installed exactly the plan."""
    env = workdir / f"env-{ifname}"
    env.write_text(f"CNI_IFNAME={ifname}\nCNI_CONTAINERID={container_id}\n"
                   f"CNI_NETNS={pod_netns}\n")
    (workdir / f"conf-{ifname}.json").write_text(json.dumps(conf))
    (workdir / f"prev-{ifname}.json").write_text(json.dumps(prev))
    facts = cli("facts", "--netns", pod_netns, "--node-netns", node_netns, "--ifname", ifname,
                defaults=defaults)
    assert facts.code == 0, facts.err
    (workdir / f"facts-{ifname}.json").write_text(facts.out)
    plan = cli("plan", "--config", str(workdir / f"conf-{ifname}.json"), "--prev-result",
               str(workdir / f"prev-{ifname}.json"), "--facts",
               str(workdir / f"facts-{ifname}.json"), "--env", str(env), "--json",
               defaults=defaults)
    assert plan.code == 0, plan.err
    desired = Desired.from_dict(plan.json()["desired"])
    assert desired.pod_objects(), f"{ifname}: an empty plan"
    before_pod, before_node = owned_objects(pod_netns), owned_objects(node_netns)
    add()
    assert owned_objects(pod_netns) == before_pod | _listed(desired.pod_objects()), ifname
    assert owned_objects(node_netns) == before_node | _listed(desired.node_objects()), ifname
    assert _read_back(pod_netns, node_netns, desired) == _expected(
        [*desired.pod_objects(), *desired.node_objects()]), ifname
    return desired


@pytest.mark.parametrize("family", ["4", "dual"])
def test_overlay_plan_is_what_add_installs(tmp_path, family):
    require_lab()
    pod = make_pod(tmp_path, family, rails=2, add=False)
    lab, rt = pod.lab, pod.pod.runtime
    try:
        for k in (1, 2):
            conflist = pod.pod.conflist(k)
            macvlan, route_tune = conflist["plugins"]
            prev = rt.invoke("ADD", macvlan, conflist, None, lab.pod_netns, f"net{k}", CID)
            desired = plan_then_add(
                tmp_path, pod.penv.defaults_file, lab.pod_netns, pod.node_netns, f"net{k}", CID,
                conflist, prev, lambda: rt.invoke("ADD", route_tune, conflist, prev,
                                                  lab.pod_netns, f"net{k}", CID))
            assert desired.mode == "overlay" and desired.node_objects()
    finally:
        lab.close()


@pytest.mark.parametrize("v6", [False, True], ids=["4", "dual"])
def test_underlay_plan_is_what_add_installs(tmp_path, underlay_factory, v6):
    topo = underlay_factory(v4=True, v6=v6, rails=1)
    defaults = tmp_path / "cli-defaults.json"
    defaults.write_text(json.dumps({"stateDir": os.path.join(topo.tmp, "state"),
                                    "logDir": os.path.join(topo.tmp, "log")}))
    pod_netns, node_netns = f"/run/netns/{topo.pod}", f"/run/netns/{topo.node}"
    for ifname in ("eth0", "net1"):
        desired = plan_then_add(tmp_path, defaults, pod_netns, node_netns, ifname,
                                UNDERLAY_CID, topo.conf(ifname), topo.prev(ifname),
                                lambda: topo.add(ifname))
        assert desired.mode == "underlay"
        # Both attachments are routed to the pod through the underlay veth's node end.
        assert desired.host_peer == "rt" + UNDERLAY_CID[:11] and desired.node_objects()
