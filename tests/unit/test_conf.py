"""Everything in conf/ parses, and every route-tune config in it passes the real config model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cniplugin.protocol import config as _config
yaml = pytest.importorskip("yaml", reason="PyYAML is in the test extra")

CONF = Path(__file__).resolve().parents[2] / "conf"
HELM_TEMPLATES = CONF / "helm/route-tune/templates"   # Go templates, not YAML until rendered
DEFAULTS = CONF / "defaults.json"


def conf_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in CONF.rglob("*") if p.suffix in suffixes
                  and HELM_TEMPLATES not in p.parents)


def yaml_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CONF / name).read_text()) if d is not None]


def route_tune_entries(conflist: dict) -> list[dict]:
    """The route-tune plugin objects of a conflist, as libcni hands them over on stdin."""
    return [{"cniVersion": conflist["cniVersion"], "name": conflist["name"], **p}
            for p in conflist["plugins"] if p["type"] == "route-tune"]


def load(entry: dict, defaults: Path = DEFAULTS) -> _config.PluginConfig:
    return _config.load(entry, {"ROUTE_TUNE_DEFAULTS": str(defaults)})


def check_conflist(conflist: dict) -> None:
    """A chain as libcni runs it: an interface plugin with IPAM first, route-tune last."""
    assert re.fullmatch(r"[a-z0-9][a-z0-9.-]*", conflist["name"])
    assert conflist["cniVersion"] in ("0.4.0", "1.0.0", "1.1.0")
    plugins = conflist["plugins"]
    assert plugins[0]["type"] in ("macvlan", "ipvlan", "sriov") and "ipam" in plugins[0]
    assert plugins[-1]["type"] == "route-tune" and len(route_tune_entries(conflist)) == 1


# ------------------------------------------------------------------ parsing

@pytest.mark.parametrize("path", conf_files(".json", ".conflist"), ids=lambda p: p.name)
def test_json_parses(path):
    assert isinstance(json.loads(path.read_text()), dict)


@pytest.mark.parametrize("path", conf_files(".yaml", ".yml"), ids=lambda p: p.name)
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_helm_templates_are_balanced():
    """No helm here to render them: at least every action closes on its line, ifs have ends."""
    for tpl in HELM_TEMPLATES.glob("*.yaml"):
        text = tpl.read_text()
        for line in text.splitlines():
            assert "{{" not in re.sub(r"{{.*?}}", "", line), (tpl, line)
        assert len(re.findall(r"{{-?\s*if\b", text)) == len(re.findall(r"{{-?\s*end\b", text))


# ------------------------------------------------------------------ route-tune configs

def test_defaults_file_validates_and_sets_the_node_keys():
    config = load({"cniVersion": "1.0.0", "name": "x", "type": "route-tune"})
    raw = json.loads(DEFAULTS.read_text())
    assert config.log_dir == raw["logDir"] and config.state_dir == raw["stateDir"]
    assert config.socket_path == raw["socketPath"] == "/run/route-tune/engine.sock"
    assert [str(c) for c in config.service_cidr] == raw["serviceCIDR"]


@pytest.mark.parametrize("k", range(1, 9))
def test_rail_conflists_validate(k):
    conflist = json.loads((CONF / f"conflist-8rail/net-rail{k}.conflist").read_text())
    check_conflist(conflist)
    assert conflist["name"] == f"net-rail{k}"
    (entry,) = route_tune_entries(conflist)
    config = load(entry)
    assert config.mode == "overlay" and config.pod_default_cni_nic == "eth0"
    assert config.detect_gateway and config.detect_ip_conflict
    # Cluster CIDRs come from the node file, so one NAD fits every cluster.
    assert config.overlay_pod_cidr and config.service_cidr


def test_rails_use_distinct_subnets_and_masters():
    lists = [json.loads(p.read_text()) for p in sorted((CONF / "conflist-8rail").iterdir())]
    assert len(lists) == 8
    assert len({c["plugins"][0]["master"] for c in lists}) == 8
    assert len({c["plugins"][0]["ipam"]["range"] for c in lists}) == 8


def test_underlay_conflist_validates():
    conflist = json.loads((CONF / "conflist-underlay.json").read_text())
    check_conflist(conflist)
    config = load(route_tune_entries(conflist)[0])
    assert config.mode == "underlay" and config.veth_mtu == 1500


def test_conf_configs_also_validate_without_a_defaults_file(tmp_path):
    for path in conf_files(".json", ".conflist"):
        data = json.loads(path.read_text())
        for entry in route_tune_entries(data) if "plugins" in data else []:
            load(entry, tmp_path / "absent.json")


# ------------------------------------------------------------------ Kubernetes objects

def test_nads_embed_the_rail_conflists_verbatim():
    nads = yaml_docs("nad-rails.yaml")
    assert [n["metadata"]["name"] for n in nads] == [f"net-rail{k}" for k in range(1, 9)]
    for nad in nads:
        assert nad["apiVersion"] == "k8s.cni.cncf.io/v1"
        assert nad["kind"] == "NetworkAttachmentDefinition"
        conflist = json.loads(nad["spec"]["config"])
        name = nad["metadata"]["name"]
        assert conflist["name"] == name
        assert conflist == json.loads((CONF / f"conflist-8rail/{name}.conflist").read_text())


def test_pod_requests_the_eight_rails_in_order():
    (pod,) = yaml_docs("pod-8rail.yaml")
    nets = pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"]
    assert [n.strip() for n in nets.split(",")] == [f"net-rail{k}@net{k}" for k in range(1, 9)]
    nads = {n["metadata"]["name"]: n["metadata"]["namespace"] for n in yaml_docs("nad-rails.yaml")}
    assert all(nads[f"net-rail{k}"] == pod["metadata"]["namespace"] for k in range(1, 9))


def daemonset() -> tuple[dict, dict]:
    configmap, ds = yaml_docs("daemonset.yaml")
    assert (configmap["kind"], ds["kind"]) == ("ConfigMap", "DaemonSet")
    return configmap, ds


def test_daemonset_install_and_serve():
    configmap, ds = daemonset()
    spec = ds["spec"]["template"]["spec"]
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"] and spec["hostNetwork"] is True
    (init,) = spec["initContainers"]
    (serve,) = spec["containers"]
    # The install step is exactly our CLI, with arguments its parser accepts.
    assert init["command"][:2] == ["cni-route-tune", "install"]
    from cniplugin.cli.install import build_parser
    args = build_parser().parse_args(init["command"][2:])
    mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    host = {v["name"]: v.get("hostPath", {}).get("path") for v in spec["volumes"]}
    assert host[mounts[args.cni_bin_dir]] == "/opt/cni/bin"
    assert host[mounts[args.runtime_dir]] == args.host_runtime_dir == "/opt/route-tune"
    assert host[mounts[str(Path(args.defaults_dest).parent)]] == "/etc/cni/route-tune"
    assert not args.overwrite_defaults
    # The shipped defaults are conf/defaults.json.
    assert json.loads(configmap["data"]["defaults.json"]) == json.loads(DEFAULTS.read_text())
    # serve: its socket, state and logs on the host paths the node defaults file names.
    assert serve["command"][:2] == ["cni-route-tune", "serve"]
    raw = json.loads(DEFAULTS.read_text())
    assert serve["command"][serve["command"].index("--socket") + 1] == raw["socketPath"]
    smounts = {m["mountPath"]: m["name"] for m in serve["volumeMounts"]}
    for key in ("stateDir", "logDir"):
        assert host[smounts[raw[key]]] == raw[key]
    assert host[smounts[str(Path(raw["socketPath"]).parent)]] == "/run/route-tune"
    caps = set(serve["securityContext"]["capabilities"]["add"])
    assert {"NET_ADMIN", "SYS_ADMIN"} <= caps
    env = {e["name"]: e["value"] for e in serve["env"]}
    assert host[smounts[str(Path(env["ROUTE_TUNE_DEFAULTS"]).parent)]] == "/etc/cni/route-tune"


def test_daemonset_rolls_without_a_gap():
    """The new pod starts beside the old one (nothing it declares keeps it from being
    scheduled there) and is Ready once its engine owns the socket; the replaced engine idles."""
    _, ds = daemonset()
    assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    spec = ds["spec"]["template"]["spec"]
    assert not any(c.get("ports") for c in spec["initContainers"] + spec["containers"])
    (serve,) = spec["containers"]
    from cniplugin.transport.service import build_parser
    args = build_parser().parse_args(serve["command"][2:])
    assert args.after_handover == "wait"
    volumes = {v["name"]: v for v in spec["volumes"]}
    ready_dir = next(m for m in serve["volumeMounts"]
                     if m["mountPath"] == str(Path(args.ready_file).parent))
    assert "emptyDir" in volumes[ready_dir["name"]]  # this pod's own, not the shared host dir
    assert args.ready_file in " ".join(serve["readinessProbe"]["exec"]["command"])
    assert spec["terminationGracePeriodSeconds"] >= 60
    template = (HELM_TEMPLATES / "daemonset.yaml").read_text()
    for line in ("maxSurge: 1", "maxUnavailable: 0", f"test -e {args.ready_file}",
                 '"--after-handover", "wait"', "terminationGracePeriodSeconds: 60", "emptyDir"):
        assert line in template, line
    assert "ports:" not in template and "containerPort" not in template


def test_helm_values_match_the_plain_manifest():
    values = yaml.safe_load((CONF / "helm/route-tune/values.yaml").read_text())
    configmap, ds = daemonset()
    spec = ds["spec"]["template"]["spec"]
    host = {v.get("hostPath", {}).get("path") for v in spec["volumes"]}
    for key in ("cniBinHostPath", "cniConfHostPath", "optHostPath", "logDir", "stateDir", "socketDir"):
        assert values[key] in host, key
    image = f"{values['image']['repository']}:{values['image']['tag']}"
    assert all(c["image"] == image for c in spec["initContainers"] + spec["containers"])
    node_keys = {"logDir": values["logDir"], "stateDir": values["stateDir"],
                 "socketPath": f"{values['socketDir']}/engine.sock"}
    assert {**values["defaults"], **node_keys} == json.loads(configmap["data"]["defaults.json"])
    chart = yaml.safe_load((CONF / "helm/route-tune/Chart.yaml").read_text())
    assert chart["appVersion"] == values["image"]["tag"]


def test_containerfile_builds_the_runtime_install_expects():
    text = (CONF / "Containerfile").read_text()
    assert "--only-binary :all:" in text and "compileall" in text
    _, ds = daemonset()
    (init,) = ds["spec"]["template"]["spec"]["initContainers"]
    from cniplugin.cli.install import build_parser
    args = build_parser().parse_args(init["command"][2:])
    assert f"COPY --from=build {args.source_runtime} {args.source_runtime}" in text


def test_daemonset_serves_metrics_without_a_host_port():
    """serve's metrics address (parsed by serve's own parser) is the port the scrape annotations
    and the PodMonitor name, and no container declares it: a hostNetwork container port is a
    host port, which would keep an upgrade's surge pod Pending."""
    from cniplugin.transport.metrics import parse_address
    from cniplugin.transport.service import build_parser
    _, ds = daemonset()
    template = ds["spec"]["template"]
    (serve,) = template["spec"]["containers"]
    args = build_parser().parse_args(serve["command"][2:])
    assert parse_address(args.metrics_address) == ("0.0.0.0", 9731)
    assert args.pod_drift_interval == 60
    assert {k: v for k, v in template["metadata"]["annotations"].items()
            if k.startswith("prometheus.io/")} == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "9731",
        "prometheus.io/path": "/metrics"}
    assert all("ports" not in c for c in template["spec"]["containers"])
    (monitor,) = yaml_docs("podmonitor.yaml")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["relabelings"][0] == {
        "sourceLabels": ["__meta_kubernetes_pod_ip"], "targetLabel": "__address__",
        "regex": "(.+)", "replacement": "$1:9731"}
    assert monitor["spec"]["selector"]["matchLabels"] == template["metadata"]["labels"]
    values = yaml.safe_load((CONF / "helm/route-tune/values.yaml").read_text())
    assert (values["metrics"]["host"], values["metrics"]["port"]) == ("0.0.0.0", 9731)
    assert values["podDriftInterval"] == args.pod_drift_interval
