"""Security (issue 8): what a namespace tenant's config (or a prevResult its IPAM produced) must not
be able to make route-tune do on the node. Each test tries, and proves it failed by comparing the
whole node (and pod) state, or the files outside route-tune's directories.

- writes stay inside the node's log and state directories;
- no node interface is touched except the pod's own host-side veth peer;
- on the node, only ``hostRuleTable`` and its one rule change; foreign tables are never exposed
  and traffic the node sends elsewhere is never captured;
- the resident socket serves root only.
"""

from __future__ import annotations

import json
import os

import pytest

from cniplugin.lab.topology import run
from harness.host import PYTHON
from harness.plugin import assert_cni_error
from harness.resident import plugin_log
from harness.snapshot import ns_state, snapshot_diff

pytestmark = [pytest.mark.netns]


# ---------------------------------------------------------------------------- files

def test_log_file_cannot_escape_the_log_dir(make_rig, tmp_path):
    """``logOptions.logFile`` naming a path outside ``logDir`` - by ``..``, absolute, or through a
    symlink planted in ``logDir`` - is refused (code 7) and no file appears outside."""
    rig = make_rig("4", rails=1)
    prev = rig.bare().add(1)
    outside = tmp_path / "outside"
    outside.mkdir()
    log_dir = rig.penv.log_dir
    (log_dir / "to-outside").symlink_to(outside)
    (log_dir / "file-link.log").symlink_to(outside / "target.log")
    depth = len(log_dir.parts) - 1
    tricks = ["../" * depth + str(outside / "a.log").lstrip("/"), str(outside / "b.log"),
              "to-outside/c.log", "file-link.log", "to-outside/../../outside/d.log"]
    before = rig.snapshot()
    for trick in tricks:
        err = assert_cni_error(rig.rt("ADD", 1, prev, keys={"logOptions": {"logFile": trick}}), 7)
        assert "logFile" in err["msg"], err
    assert sorted(p.name for p in outside.iterdir()) == [], "a file was written outside logDir"
    rig.assert_unchanged(before, "after refused logFile tricks")


@pytest.mark.parametrize("key,value", [("stateDir", "/tmp/rtR-state-escape"),
                                       ("logDir", "/tmp/rtR-log-escape"),
                                       ("socketPath", "/tmp/rtR-escape.sock")])
def test_node_only_directories_cannot_come_from_a_conflist(make_rig, key, value):
    """``stateDir``/``logDir``/``socketPath`` in a network config are refused (code 7) for ADD, CHECK
    and DEL alike, and nothing is created at the named path."""
    rig = make_rig("4", rails=1)
    prev = rig.bare().add(1)
    before = rig.snapshot()
    for command in ("ADD", "CHECK", "DEL"):
        err = assert_cni_error(rig.rt(command, 1, prev, keys={key: value}), 7)
        assert key in err["msg"], err
    assert not os.path.lexists(value)
    rig.assert_unchanged(before, f"after {key} in a conflist")


# ---------------------------------------------------------------------------- node interfaces

def test_pod_link_posing_as_the_host_peer_is_refused(make_rig):
    """``podDefaultCniNic`` names a pod veth whose peer lives in ANOTHER netns but whose ifindexes
    were chosen to mirror a node veth (``victim``: its peer index is our veth's index, our peer
    index is its index). Only the link-netnsid tells them apart: ADD must fail (code 102) and the
    node - ``victim`` included - stays exactly as it was."""
    rig = make_rig("4", rails=1)
    lab = rig.lab
    prev = rig.bare().add(1)
    lab.ip(lab.node, "link", "add", "victim", "index", "5000", "type", "veth", "peer", "name",
           "victimpeer", "netns", lab.gw(1), "index", "4000")
    lab.ip(lab.infra, "link", "add", "evilpeer", "index", "5000", "type", "veth", "peer", "name",
           "evil0", "netns", lab.pod, "index", "4000")
    for ns, dev in ((lab.node, "victim"), (lab.infra, "evilpeer"), (lab.pod, "evil0")):
        lab.ip(ns, "link", "set", dev, "up")
    lab.ip(lab.pod, "addr", "add", "10.233.119.200/32", "dev", "evil0")
    before = rig.snapshot()
    assert_cni_error(rig.rt("ADD", 1, prev, keys={"podDefaultCniNic": "evil0"}), 102)
    rig.assert_unchanged(before, "after a pod link posed as the host peer")


def test_node_netns_posing_as_the_pod_is_refused(make_rig):
    """CNI_NETNS names the NODE's own netns, CNI_IFNAME a node link (``rail1``) and
    ``podDefaultCniNic`` the pod's host peer (a veth in the node): route-tune would treat the node
    as the pod. It must refuse (code 102: that veth's peer is not in "this node") and change
    nothing on the node."""
    rig = make_rig("4", rails=1)
    lab = rig.lab
    prev = rig.bare().add(1)
    before = rig.snapshot()
    reply = rig.rt("ADD", 1, prev, netns=f"/run/netns/{lab.node}", ifname="rail1",
                   keys={"podDefaultCniNic": lab.cali})
    assert_cni_error(reply, 102)
    rig.assert_unchanged(before, "after CNI_NETNS named the node")


def test_macvlan_as_pod_default_nic_is_refused(make_rig):
    """``podDefaultCniNic`` naming the pod's OTHER rail (a macvlan whose IFLA_LINK points at the
    node's ``rail2``, link-netnsid = the node): not a veth, so code 102 and no node change."""
    rig = make_rig("4", rails=2)
    bare = rig.bare()
    prev = bare.add(1)
    bare.add(2)
    before = rig.snapshot()
    assert_cni_error(rig.rt("ADD", 1, prev, keys={"podDefaultCniNic": "net2"}), 102)
    rig.assert_unchanged(before, "after podDefaultCniNic named a macvlan")


def test_node_changes_confined_to_host_rule_table(make_rig):
    """A valid but adversarial ADD (its own hostRuleTable, policy routes, cluster CIDRs covering
    the node's subnet, podDefaultRouteNic and prevResult interfaces naming NODE links, rp_filter,
    txqueuelen, MAC prefix) changes on the node ONLY: rules ``from all lookup T pref 1000 proto
    231``, routes of table T on the pod's own host peer, and PERMANENT neighbours on that peer.
    DEL then restores the node exactly."""
    # The node allows a second table, so the NAD's own hostRuleTable is accepted at all.
    rig = make_rig("dual", rails=1, allowedHostRuleTables=[500, 4242])
    lab = rig.lab
    prev = rig.bare().add(1)
    hostile_prev = {**prev, "interfaces": [*prev["interfaces"], {"name": "uplink"}, {"name": lab.cali}],
                    "routes": [{"dst": "10.1.20.0/24", "gw": "172.16.11.254"}]}
    keys = {"hostRuleTable": 4242, "podDefaultRouteNic": "uplink", "podRPFilter": 2,
            "txQueueLen": 77, "podMACPrefix": "0e:42", "serviceCIDR": ["10.1.20.0/24", "10.233.0.0/18"],
            "hijackCIDR": ["10.0.0.0/8"], "policyRoutes": [{"dst": "10.1.0.0/16", "gw": "172.16.11.254"}]}
    before = rig.snapshot()
    reply = rig.rt("ADD", 1, hostile_prev, keys=keys)
    assert reply.code == 0, str(reply)
    node_after = ns_state(lab.node)
    stray = node_changes_outside(before[lab.node], node_after, table="4242", peer=lab.cali)
    assert stray == "", f"node changes outside hostRuleTable 4242:\n{stray}"
    assert rig.rt("DEL", 1, hostile_prev, keys=keys).code == 0
    rig.assert_unchanged(before, "after DEL of the adversarial ADD")


def node_changes_outside(before: dict, after: dict, table: str, peer: str) -> str:
    """The node diff once route-tune's allowed entries are taken out of ``after``."""
    def allowed_rule(r: dict) -> bool:
        return (r.get("src") == "all" and str(r.get("table")) == table and r.get("priority") == 1000
                and str(r.get("protocol")) == "231")

    def allowed_route(r: dict) -> bool:
        return str(r.get("table")) == table and r.get("dev") == peer and str(r.get("protocol")) == "231"

    def allowed_neigh(n: dict) -> bool:
        return n.get("dev") == peer and str(n.get("protocol")) == "231"

    filtered = dict(after)
    for key, keep in (("rules4", allowed_rule), ("rules6", allowed_rule), ("routes4", allowed_route),
                      ("routes6", allowed_route), ("neigh", allowed_neigh)):
        filtered[key] = [e for e in after[key] if e in before[key] or not keep(e)]
    return snapshot_diff({"node": before}, {"node": filtered})


# ---------------------------------------------------------------------------- node routing

def test_host_rule_table_holding_foreign_routes_is_refused(make_rig):
    """The node already uses table 600 for its own policy (a default route via the uplink).
    ``hostRuleTable: 600`` would put ``from all lookup 600`` in front of main and send ALL node
    traffic through that foreign table: a NetworkAttachmentDefinition may only use the node's
    own table (or what the node defaults file allows), so ADD refuses (code 7), changing
    nothing."""
    rig = make_rig("4", rails=1)
    lab = rig.lab
    prev = rig.bare().add(1)
    lab.ip(lab.node, "route", "add", "default", "via", "10.1.20.1", "dev", "uplink", "table", "600")
    before = rig.snapshot()
    assert_cni_error(rig.rt("ADD", 1, prev, keys={"hostRuleTable": 600}), 7)
    rig.assert_unchanged(before, "after hostRuleTable named a foreign table")


@pytest.mark.parametrize("address,why", [
    ("10.1.20.77/24", "a neighbour on the node's own uplink subnet (another node, the API server)"),
    ("10.233.99.9/24", "another workload: the node routes 10.233.99.9/32 to another veth"),
])
def test_rail_address_cannot_capture_node_traffic(make_rig, address, why):
    """A tenant's IPAM puts an address that the node already reaches ELSEWHERE on net1 (and
    reports it in prevResult). route-tune's ``<ip>/32 dev <peer> table 500`` at pref 1000 would
    take the node's traffic for it into this pod: ADD must refuse (code 107), nothing changes."""
    rig = make_rig("4", rails=1)
    lab = rig.lab
    prev = rig.bare().add(1)
    lab.ip(lab.node, "link", "add", "caliother", "type", "veth", "peer", "name", "othereth0")
    lab.ip(lab.node, "link", "set", "caliother", "up")
    lab.ip(lab.node, "link", "set", "othereth0", "up")
    lab.ip(lab.node, "route", "add", "10.233.99.9/32", "dev", "caliother", "scope", "link")
    lab.ip(lab.pod, "addr", "add", address, "dev", "net1")
    hostile = {**prev, "ips": [{"address": address, "interface": 0}]}
    before = rig.snapshot()
    reply = rig.rt("ADD", 1, hostile)
    if reply.code == 0:
        rig.rt("DEL", 1, hostile)
    assert_cni_error(reply, 107)
    rig.assert_unchanged(before, f"after net1 claimed {why}")


# ---------------------------------------------------------------------------- resident socket

@pytest.mark.parametrize("engine", ["resident"], indirect=True)
def test_resident_socket_refuses_non_root(make_rig):
    """A uid-65534 process (inside the node netns) asks the resident engine for a real ADD. With
    the shipped permissions it cannot even connect; with the socket path opened up by mistake,
    SO_PEERCRED still refuses it (code 107). Either way nothing is applied."""
    rig = make_rig("4", rails=1)
    lab = rig.lab
    prev = rig.bare().add(1)
    rig.rt("DEL", 1, prev)  # one served request, so the served-count check of teardown holds
    before = rig.snapshot()
    env = {**rig.env("ADD", "net1"), "ROUTE_TUNE_ENGINE": "resident"}
    stdin = json.dumps({**rig.conf(1), "prevResult": prev}).encode()
    path = rig.server.sock
    for parent in [p for p in path.parents if str(p).startswith(str(lab.tmp))] + [lab.tmp]:
        os.chmod(parent, 0o711 if parent != path.parent else 0o700)
    assert nobody_forward(lab.node, env, stdin)["error"] == "PermissionError"
    os.chmod(path.parent, 0o711)
    os.chmod(path, 0o666)
    got = nobody_forward(lab.node, env, stdin)
    assert got["code"] == 1 and json.loads(got["stdout"])["code"] == 107, got
    rig.assert_unchanged(before, "after a non-root peer asked for ADD")
    assert rig.server.answers()
    assert "only root may use the engine" in rig.server.log() + plugin_log(rig.penv)


def nobody_forward(node_ns: str, env: dict, stdin: bytes) -> dict:
    """Run the shim's ``forward`` as uid/gid 65534 inside ``node_ns``; its outcome as a dict."""
    script = (
        "import json, sys, os\n"
        "from cniplugin.transport import shim as _shim\n"
        "env = json.loads(sys.argv[1]); stdin = sys.stdin.buffer.read()\n"
        "try:\n"
        "    sock = _shim.socket_path(env)\n"
        "    import socket; s = socket.socket(socket.AF_UNIX); s.connect(sock); s.close()\n"
        "except OSError as exc:\n"
        "    print(json.dumps({'error': type(exc).__name__})); sys.exit(0)\n"
        "code, out, err = _shim.forward(env, stdin)\n"
        "print(json.dumps({'code': code, 'stdout': out.decode(), 'error': ''}))\n")
    proc = run("ip", "netns", "exec", node_ns, "setpriv", "--reuid=65534", "--regid=65534",
               "--clear-groups", str(PYTHON), "-c", script, json.dumps(env), stdin=stdin.decode())
    return json.loads(proc.stdout)
