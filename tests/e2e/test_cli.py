"""``cni-route-tune`` against real namespaces: show, facts, plan, verify, explain, replay, probe
and orphans on a Calico-style pod with rails, run through the installed executables.

Labs are `cniplugin.lab` topologies named by the harness (``harness.lab.NAMES``; leftovers of
dead sessions are removed); the plugin chains run through ``PyRuntime`` (the real ``route-tune`` and Debian's
macvlan/host-local), so these tests need no Go toolchain.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from cniplugin.lab.runtime import PyRuntime
from cniplugin.lab.topology import OverlayLab, ip_batch
from cniplugin.records.facts import Facts
from harness.cli import CID, CliPod, cli, make_pod, require_lab
from harness.golden import assert_golden, normalise
from harness.lab import NAMES
from harness.snapshot import owned_objects

pytestmark = [pytest.mark.netns]


def assert_output(pod: CliPod, text: str, name: str, *paths: Path) -> None:
    """The whole output equals ``tests/unit/golden/cli/<name>.txt`` (``harness.golden``)."""
    assert_golden(normalise(text, NAMES.prefix, pod.penv.workdir, *paths), f"cli/{name}.txt")


@pytest.fixture(scope="module")
def healthy(tmp_path_factory, lab_session) -> CliPod:
    """A dual-stack pod with three rails, all attached; shared by the read-only tests."""
    require_lab()
    pod = make_pod(tmp_path_factory.mktemp("cli"), "dual", 3)
    try:
        yield pod
    finally:
        pod.lab.close()


@pytest.fixture
def fresh(tmp_path, lab_session):
    """Factory of private pods for tests that break things."""
    require_lab()
    pods: list[CliPod] = []

    def make(family: str = "4", rails: int = 3, add: bool = True) -> CliPod:
        pods.append(make_pod(tmp_path, family, rails, add))
        return pods[-1]

    try:
        yield make
    finally:
        for pod in pods:
            pod.lab.close()


def _short(prefix: str) -> str:
    return prefix.removesuffix("/32").removesuffix("/128")


def _kernel_rules(lab: OverlayLab, ns: str) -> set[tuple]:
    out = set()
    for fam in ("4", "6"):
        for r in json.loads(lab.ip(ns, "-j", f"-{fam}", "rule", "show")):
            out.add((fam, r["priority"], r.get("src", "all"), str(r["table"])))
    return out


def _json_rules(rules: list[dict]) -> set[tuple]:
    names = {255: "local", 254: "main", 253: "default"}
    return {(str(r["family"]), r["priority"], _short(r["src"]) or "all",
             names.get(r["table"], str(r["table"]))) for r in rules}


# -- show ----------------------------------------------------------------------------------
def test_show_healthy_pod_text(healthy):
    lab = healthy.lab
    run = healthy.cli("show", "--netns", lab.pod)
    assert run.code == 0, run.out + run.err
    # Per rail: its addresses, its table 10K with the source rule and default route of
    # route-tune; eth0's own default route belongs to the cluster CNI (foreign).
    assert_output(healthy, run.out, "show_healthy")


def test_show_json_agrees_with_the_kernel(healthy):
    lab = healthy.lab
    run = healthy.cli("show", "--netns", f"/run/netns/{lab.pod}", "--json")
    assert run.code == 0, run.err
    data = run.json()
    assert data["problems"] == []
    assert {(a["container_id"], a["ifname"], a["table"]) for a in data["attachments"]} == {
        (CID, f"net{k}", 100 + k) for k in (1, 2, 3)}
    interfaces = {i["name"]: i for i in data["interfaces"]}
    rules = data["other_rules"] + [r for i in data["interfaces"] for r in i["rules"]]
    assert _json_rules(rules) == _kernel_rules(lab, lab.pod)
    for k in (1, 2, 3):
        iface = interfaces[f"net{k}"]
        assert {r["owner"] for r in iface["rules"]} == {"route-tune"}
        (table,) = iface["tables"]
        assert table["table"] == 100 + k
        for fam in ("4", "6"):
            kernel = json.loads(lab.ip(lab.pod, "-j", f"-{fam}", "route", "show", "table",
                                       str(100 + k)))
            want = {r["dst"] for r in kernel}
            got = {"default" if r["dst"] in ("0.0.0.0/0", "::/0") else _short(r["dst"])
                   for r in table["routes"] if str(r["family"]) == fam}
            assert got == want
    assert {r["owner"] for r in interfaces["eth0"]["neighbours"]} == {"route-tune"}


def test_show_node_side(healthy):
    lab = healthy.lab
    run = healthy.cli("show", "--netns", lab.pod, "--node", "--node-netns", healthy.node_netns,
                      "--json")
    assert run.code == 0, run.out + run.err
    node = run.json()["node"]
    assert node["host_peer"] == lab.cali and node["host_rule_tables"] == [500]
    assert sorted((r["family"], r["priority"], r["owner"]) for r in node["rules"]) == [
        (4, 1000, "route-tune"), (6, 1000, "route-tune")]
    assert {_short(r["dst"]) for r in node["routes"]} == {
        lab.rail_ip(k, f) for k in (1, 2, 3) for f in ("4", "6")}
    assert {n["ip"] for n in node["neighbours"]} == {
        lab.rail_ip(k, f) for k in (1, 2, 3) for f in ("4", "6")}
    text = healthy.cli("show", "--netns", lab.pod, "--node", on_node=True)
    assert text.code == 0, text.out + text.err
    assert_output(healthy, text.out, "show_node")


def test_show_pod_route_tune_never_touched(fresh):
    pod = fresh("4", rails=1, add=False)
    lab = pod.lab
    run = pod.cli("show", "--netns", lab.pod, "--json")
    assert run.code == 0, run.out + run.err
    data = run.json()
    assert data["attachments"] == [] and data["problems"] == []
    objects = data["other_rules"] + [x for i in data["interfaces"] for key in
                                     ("rules", "main_routes", "neighbours") for x in i[key]]
    assert objects and {o["owner"] for o in objects} == {"foreign"}
    assert_output(pod, pod.cli("show", "--netns", lab.pod).out, "show_untouched")
    # Foreign policy routing with holes: a rule into an empty table, a table nobody reaches.
    lab.ip(lab.pod, "rule", "add", "from", lab.pod_ip("4"), "lookup", "150", "pref", "200")
    lab.ip(lab.pod, "route", "add", "192.0.2.0/24", "dev", "eth0", "table", "160")
    run = pod.cli("show", "--netns", lab.pod, "--json")
    assert run.code == 1
    kinds = {p["kind"]: p["message"] for p in run.json()["problems"]}
    assert set(kinds) == {"empty-table", "unreachable-table"}
    assert "lookup 150" in kinds["empty-table"] and "table 160" in kinds["unreachable-table"]
    # Filling table 150 without a default route: a source-routed interface without default.
    lab.ip(lab.pod, "route", "add", "198.51.100.0/24", "dev", "eth0", "table", "150")
    text = pod.cli("show", "--netns", lab.pod)
    assert text.code == 1
    assert_output(pod, text.out, "show_no_default")
    # Nothing to verify: ADD never ran.
    conf = pod.conflist_file(1)
    run = pod.cli("verify", "--config", str(conf), "--netns", lab.pod)
    assert (run.code, run.out) == (1, "")
    assert_output(pod, run.err, "verify_no_state")


# -- drift: show and verify ----------------------------------------------------------------
def test_drift_shown_and_verified(fresh):
    pod = fresh("4", rails=3)
    lab = pod.lab
    conf = {k: str(pod.conflist_file(k)) for k in (1, 3)}
    run = pod.cli("verify", "--config", conf[3], "--netns", lab.pod,
                  "--node-netns", pod.node_netns)
    assert run.code == 0, run.out + run.err
    assert_output(pod, run.out, "verify_no_drift")

    lab.ip(lab.pod, "route", "del", "default", "table", "103")
    missing = "ip route replace default via 172.16.13.254 dev net3 table 103 proto 231"
    show = pod.cli("show", "--netns", lab.pod, "--json")
    assert show.code == 1
    problems = show.json()["problems"]
    assert {p["kind"] for p in problems} == {"no-default", "state-drift"}
    assert any("net3: IPv4 table 103" in p["message"] for p in problems)
    assert any(missing in p["message"] and f"{CID}/net3" in p["message"] for p in problems)

    run = pod.cli("verify", "--config", conf[3], "--netns", lab.pod,
                  "--node-netns", pod.node_netns)
    assert run.code == 1
    assert_output(pod, run.out, "verify_pod_drift")
    data = pod.cli("verify", "--config", conf[3], "--netns", lab.pod, "--json").json()
    assert data["ok"] is False and [d["expected"] for d in data["drift"]] == [missing]
    assert pod.cli("verify", "--config", conf[1], "--netns", lab.pod).code == 0
    # The plugin's own CHECK sees the same drift (one engine).
    with pytest.raises(Exception, match="drifted"):
        pod.pod.check(3)

    lab.ip(lab.node, "route", "del", lab.rail_ip(1, "4"), "table", "500")
    node_missing = f"ip route replace 172.16.11.10 dev {lab.cali} scope link table 500 proto 231"
    run = pod.cli("verify", "--config", conf[1], "--netns", lab.pod,
                  "--node-netns", pod.node_netns)
    assert run.code == 1
    assert_output(pod, run.out, "verify_node_drift")
    run = pod.cli("verify", "--config", conf[1], "--netns", lab.pod)
    assert run.code == 0
    assert_output(pod, run.out, "verify_pod_only")
    show = pod.cli("show", "--netns", lab.pod, "--node", "--node-netns", pod.node_netns)
    assert_output(pod, show.out, "show_node_drift")


# -- facts and plan ------------------------------------------------------------------------
def test_facts_dump(healthy):
    lab = healthy.lab
    run = healthy.cli("facts", "--netns", lab.pod, "--node-netns", healthy.node_netns)
    assert run.code == 0, run.err
    facts = Facts.from_dict(run.json())
    assert facts.node is not None and facts.node.host_peer.name == lab.cali
    assert lab.node_ip("4") in facts.node.node_ips
    assert {a.address for a in facts.pod.addrs_of("net2")} == {lab.rail_ip(2, "4"),
                                                               lab.rail_ip(2, "6")}
    # `show --json` carries the same facts, so a saved show is a plan input too.
    show = healthy.cli("show", "--netns", lab.pod, "--node-netns", healthy.node_netns, "--json")
    assert show.json()["facts"] == run.json()
    # Run on the node itself (no --node-netns): the same facts.
    on_node = healthy.cli("facts", "--netns", lab.pod, on_node=True)
    assert on_node.code == 0 and on_node.json() == run.json()


def _plan_sides(text: str) -> tuple[set[str], set[str], list[str], list[str]]:
    pod, node, sysctls, displaced, current = set(), set(), [], [], None
    for line in text.splitlines():
        if line.startswith("# pod"):
            current = pod
        elif line.startswith("# node"):
            current = node
        elif line.startswith("sysctl -w "):
            sysctls.append(line.split()[2])
        elif " route del " in line:
            displaced.append(line)
        elif line.startswith("ip "):
            current.add(line)
    return pod, node, sysctls, displaced


@pytest.mark.parametrize("family", ["4", "dual"])
def test_plan_is_what_add_installs(fresh, family):
    pod = fresh(family, rails=3, add=False)
    lab, penv, rt = pod.lab, pod.penv, pod.pod.runtime
    public = Path(tempfile.mkdtemp(prefix=f"{lab.prefix}-lab-public-"))
    public.chmod(0o755)
    try:
        for k in (1, 2, 3):
            conflist = pod.pod.conflist(k)
            macvlan, route_tune = conflist["plugins"]
            prev = rt.invoke("ADD", macvlan, conflist, None, lab.pod_netns, f"net{k}", CID)
            files = {"conf": conflist, "prev": prev}
            for name, data in files.items():
                (penv.workdir / f"{name}{k}.json").write_text(json.dumps(data))
            env = penv.workdir / f"env{k}"
            env.write_text(f"CNI_IFNAME=net{k}\nCNI_CONTAINERID={CID}\n"
                           f"CNI_NETNS={lab.pod_netns}\n")
            facts = pod.cli("facts", "--netns", lab.pod, "--node-netns", pod.node_netns)
            assert facts.code == 0, facts.err
            (penv.workdir / f"facts{k}.json").write_text(facts.out)
            args = ["plan", "--config", str(penv.workdir / f"conf{k}.json"), "--prev-result",
                    str(penv.workdir / f"prev{k}.json"), "--facts",
                    str(penv.workdir / f"facts{k}.json"), "--env", str(env)]
            plan = pod.cli(*args)
            assert plan.code == 0, plan.err
            as_json = pod.cli(*args, "--json").json()
            assert plan.out.splitlines()[2:len(as_json["lines"]) + 2] == as_json["lines"]
            pod_lines, node_lines, sysctls, displaced = _plan_sides(plan.out)
            assert pod_lines and node_lines and not displaced
            if k == 1:
                # No root and no namespace: the same plan as uid nobody, from public copies.
                for name in ("conf", "prev", "facts", "env"):
                    src = penv.workdir / (f"{name}{k}.json" if name != "env" else f"env{k}")
                    shutil.copy(src, public / src.name)
                    (public / src.name).chmod(0o644)
                shutil.copy(penv.defaults_file, public / "defaults.json")
                (public / "defaults.json").chmod(0o644)
                nobody = cli("plan", "--config", str(public / "conf1.json"), "--prev-result",
                             str(public / "prev1.json"), "--facts", str(public / "facts1.json"),
                             "--env", str(public / "env1"), defaults=public / "defaults.json",
                             user=65534)
                assert nobody.code == 0, nobody.err
                assert _plan_sides(nobody.out) == _plan_sides(plan.out)
            before_pod, before_node = owned_objects(lab.pod_netns), owned_objects(pod.node_netns)
            rt.invoke("ADD", route_tune, conflist, prev, lab.pod_netns, f"net{k}", CID)
            after_pod, after_node = owned_objects(lab.pod_netns), owned_objects(pod.node_netns)
            assert after_pod == before_pod | pod_lines, f"net{k}"
            assert after_node == before_node | node_lines, f"net{k}"
            for setting in sysctls:
                path, value = setting.split("=")
                assert lab.exec(lab.pod, "cat", f"/proc/sys/{path}").stdout.strip() == value
    finally:
        shutil.rmtree(public, ignore_errors=True)


def test_plan_from_prev_result_alone(healthy, tmp_path):
    """Without --facts: a plan from prevResult only, its assumptions stated, no root."""
    conf = healthy.conflist_file(2)
    prev = tmp_path / "prev.json"
    prev.write_text(json.dumps(healthy.pod.results[2]))
    run = healthy.cli("plan", "--config", str(conf), "--prev-result", str(prev))
    assert run.code == 0, run.err
    # Facts derived from prevResult alone (no eth0 address, no node facts): no node side.
    assert_output(healthy, run.out, "plan_prev_result_only")


# -- explain -------------------------------------------------------------------------------
def test_explain_agrees_with_the_kernel(healthy):
    lab = healthy.lab
    cases = []  # (dst, src, iif, expected table, expected dev)
    for fam in ("4", "6"):
        for k in (1, 3):
            src = lab.rail_ip(k, fam)
            cases += [(lab.behind_ip(k, fam), src, "", 100 + k, f"net{k}"),
                      (lab.gw_ip(k, fam), src, "", 100 + k, f"net{k}"),
                      (lab.node_ip(fam), src, "", 100 + k, "eth0"),
                      (src, lab.gw_ip(k, fam), f"net{k}", 255, "lo")]
        external = "192.0.2.1" if fam == "4" else "2001:db8::1"
        cases += [(external, "", "", 254, "eth0"), (external, lab.pod_ip(fam), "", 100, "eth0")]
    cases.append(("10.233.0.10", lab.rail_ip(2, "4"), "", 102, "eth0"))
    for dst, src, iif, table, dev in cases:
        args = ["explain", dst, "--netns", lab.pod, "--json"]
        args += ["--from", src] if src else []
        args += ["--iif", iif] if iif else []
        run = healthy.cli(*args)
        assert run.code == 0, run.out + run.err
        data = run.json()
        case = f"{dst} from {src or '-'} iif {iif or '-'}"
        assert data["agree"], (case, data["disagreement"])
        assert (data["walk"]["table"], data["walk"]["dev"]) == (table, dev), case
        assert (data["kernel"]["table"], data["kernel"]["dev"]) == (table, dev), case
        if not iif:  # iproute2's own answer, independent of our netlink code
            assert lab.route_get(lab.pod, dst, src or None)["dev"] == dev, case
    text = healthy.cli("explain", lab.behind_ip(3, "4"), "--from", lab.rail_ip(3, "4"),
                       "--netns", lab.pod)
    assert text.code == 0
    assert_output(healthy, text.out, "explain_rail3")


# -- replay ----------------------------------------------------------------------------------
def _captured(pod: CliPod, k: int, command: str, tmp: Path) -> tuple[Path, Path]:
    conflist = pod.pod.conflist(k)
    prev = PyRuntime(pod.lab.node, pod.penv).cached_result(conflist, CID, f"net{k}")
    stdin = {**conflist["plugins"][-1], "name": conflist["name"],
             "cniVersion": conflist["cniVersion"], "prevResult": prev}
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": CID, "CNI_NETNS": pod.lab.pod_netns,
           "CNI_IFNAME": f"net{k}", "CNI_PATH": pod.penv.cni_path,
           "ROUTE_TUNE_DEFAULTS": str(pod.penv.defaults_file)}
    (tmp / f"{command}.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    (tmp / f"{command}.json").write_text(json.dumps(stdin))
    return tmp / f"{command}.env", tmp / f"{command}.json"


def test_replay(healthy, tmp_path):
    env, stdin = _captured(healthy, 2, "CHECK", tmp_path)
    base = ["replay", "--env", str(env), "--stdin", str(stdin), "--node-netns",
            healthy.node_netns]
    run = healthy.cli(*base)
    assert run.code == 0, run.out + run.err
    assert_output(healthy, run.out, "replay_check", tmp_path)
    gone = healthy.cli(*base, "--netns-override", f"/run/netns/{NAMES.prefix}-gone", "--json")
    assert gone.code == 1
    data = gone.json()
    reply = json.loads(data["stdout"])
    assert data["exit_code"] == 1 and reply["code"] and f"{NAMES.prefix}-gone" in reply["msg"]
    env, stdin = _captured(healthy, 2, "ADD", tmp_path)  # a retried ADD converges
    run = healthy.cli("replay", "--env", str(env), "--stdin", str(stdin), "--node-netns",
                      healthy.node_netns, "--json")
    assert run.code == 0, run.out
    result = json.loads(run.json()["stdout"])
    assert result["interfaces"][0]["name"] == "net2"
    assert healthy.cli("show", "--netns", healthy.lab.pod).code == 0


# -- probe -----------------------------------------------------------------------------------
def test_probe(healthy):
    lab = healthy.lab
    run = healthy.cli("probe", "--netns", lab.pod, "--ifname", "net1")
    assert run.code == 0, run.out + run.err
    assert_output(healthy, run.out, "probe_net1")
    run = healthy.cli("probe", "--netns", lab.pod, "--ifname", "net1", "--gateway",
                      "172.16.11.77", "--timeout", "50ms", "--json")
    assert run.code == 1
    assert "172.16.11.77 is unreachable from net1" in run.json()["gateway"]["error"]
    mac = json.loads(lab.ip(lab.gw(2), "-j", "link", "show", "rail"))[0]["address"]
    lab.ip(lab.gw(2), "addr", "add", f"{lab.rail_ip(2, '4')}/32", "dev", "rail")
    try:
        run = healthy.cli("probe", "--netns", lab.pod, "--ifname", "net2")
    finally:
        lab.ip(lab.gw(2), "addr", "del", f"{lab.rail_ip(2, '4')}/32", "dev", "rail")
    assert run.code == 1
    assert f"already in use by MAC {mac}" in run.out  # the gateway's own MAC, not any MAC
    assert_output(healthy, run.out, "probe_conflict")


# -- orphans ---------------------------------------------------------------------------------
def test_orphans_found_and_removed(fresh):
    pod = fresh("4", rails=2)
    lab = pod.lab
    base = ["orphans", "--node-netns", pod.node_netns]
    run = pod.cli(*base)
    assert run.code == 0, run.out + run.err
    lab.ip(lab.node, "route", "add", "172.16.99.1", "dev", "uplink", "table", "500",
           "proto", "231")
    run = pod.cli(*base, "--json")
    assert run.code == 1
    assert [o["text"] for o in run.json()["objects"]] == [
        "172.16.99.1 dev uplink proto 231 scope link"]
    # The pod vanishes without a DEL: its state files are stale, its node rule stays.
    ip_batch([f"netns del {lab.pod}"])
    run = pod.cli(*base)
    assert run.code == 1
    assert_output(pod, run.out, "orphans_stale")
    run = pod.cli(*base, "--remove")
    assert run.code == 0, run.out + run.err
    assert_output(pod, run.out, "orphans_removed")
    assert pod.cli(*base).code == 0
    for fam in ("4", "6"):
        assert "proto 231" not in lab.ip(lab.node, f"-{fam}", "rule", "show")
    assert lab.ip(lab.node, "route", "show", "table", "500") == ""
    assert lab.ip(lab.node, "neigh", "show", "proto", "231") == ""
    assert list((pod.penv.state_dir / "attachments").iterdir()) == []


# -- not found -------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["show", "facts", "verify", "explain", "probe"])
def test_netns_that_does_not_exist(tmp_path, command):
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"cniVersion": "1.0.0", "name": "rail1", "type": "route-tune"}))
    name = f"{NAMES.prefix}-nonexistent"
    args = {"show": [], "facts": [], "verify": ["--config", str(conf), "--ifname", "net1"],
            "explain": ["192.0.2.1"], "probe": ["--ifname", "net1"]}[command]
    run = cli(command, *args, "--netns", name, "--state-dir", str(tmp_path)) \
        if command in ("show", "verify") else cli(command, *args, "--netns", name)
    assert run.code == 3, run.out + run.err
    assert run.out == ""
    assert_golden(normalise(run.err, NAMES.prefix, tmp_path), f"cli/not_found_{command}.txt")
