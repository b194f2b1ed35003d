"""The lab and both runtimes themselves, driven with Debian's plugins only (no route-tune).

These pin down what the route-tune suites rely on: the topology answers as documented,
libcni's cache/prevResult behaviour, and that PyRuntime mimics libcni.
"""

from __future__ import annotations

import json

import pytest

from cniplugin.lab.runtime import CniFailure, Libcni, PyRuntime, RailPod
from cniplugin.lab.topology import netns_names
from harness.snapshot import assert_same, snapshot

pytestmark = [pytest.mark.netns, pytest.mark.libcni]


@pytest.mark.parametrize("family", ["4", "6", "dual"])
def test_topology_answers_as_documented(overlay_lab, family):
    lab = overlay_lab(family, rails=2)
    pairs = [(lab.pod_ip(f), lab.node_ip(f)) for f in lab.families]
    assert all(p["ok"] for p in lab.ping_many(lab.pod, pairs)), pairs
    assert all(p["ok"] for p in lab.ping_many(lab.node, [("", lab.pod_ip(f)) for f in lab.families]))
    for k in (1, 2):
        gw_pairs = [(lab.gw_ip(k, f), lab.behind_ip(k, f)) for f in lab.families]
        assert all(p["ok"] for p in lab.ping_many(lab.gw(k), gw_pairs))
    # The state snapshot is stable while nobody changes anything.
    assert_same(snapshot(lab), snapshot(lab), "unchanged lab")


def test_lab_close_removes_every_namespace(overlay_lab):
    lab = overlay_lab("4", rails=1)
    assert len(netns_names(lab.prefix + "-")) == 4
    lab.close()
    assert netns_names(lab.prefix + "-") == []


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_libcni_and_pyruntime_agree_on_a_macvlan_chain(overlay_lab, plugin_env, libcni, version):
    lab = overlay_lab("dual", rails=1)
    penv = plugin_env("dual", name=lab.prefix)
    before = snapshot(lab)
    results = {}
    for name, runtime in (("libcni", Libcni(lab.node, penv, libcni)), ("py", PyRuntime(lab.node, penv))):
        pod = RailPod(lab, penv, runtime, chained="sbr", cni_version=version)
        results[name] = pod.add(1)
        cache = penv.cache_dir / "results" / f"rail1-{pod.container_id}-net1"
        assert json.loads(cache.read_text())["result"]["ips"], "the runtime caches the final result"
        assert pod.lab.route_get(lab.pod, lab.behind_ip(1, "4"), lab.rail_ip(1, "4"))["dev"] == "net1"
        pod.delete(1)
        assert not cache.exists(), "the cache is removed after DEL"
        # Debian's sbr 1.1.1 fails a second DEL (link gone): the runtime reports its error.
        with pytest.raises(CniFailure) as err:
            pod.delete(1)
        assert err.value.code == 999 and "Link not found" in err.value.msg
        assert_same(before, snapshot(lab), f"{name} DEL")
    for result in results.values():
        result["interfaces"][0].pop("mac")
    assert results["libcni"] == results["py"]
    assert results["py"]["cniVersion"] == version
    assert all(("version" in ip) == (version == "0.4.0") for ip in results["py"]["ips"])


def test_libcni_check_below_040_is_refused(overlay_lab, plugin_env, libcni):
    lab = overlay_lab("4", rails=1)
    penv = plugin_env("4", name=lab.prefix)
    pod = RailPod(lab, penv, Libcni(lab.node, penv, libcni), chained=None, cni_version="0.3.1")
    pod.add(1)
    with pytest.raises(CniFailure, match="does not support the CHECK command"):
        pod.check(1)
    pod.delete(1)
