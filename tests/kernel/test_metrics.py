"""The resident engine's metrics and pod drift reports, scraped from a real engine in a lab.

One lab and one engine (``--metrics-address``, pod drift checked every second) serve the module;
each test compares whole before/after dicts of the series it is about, so what other tests (or
the engine's own rounds) add to other series does not matter.
"""

from __future__ import annotations

import os
import re
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cniplugin._version import __version__
from cniplugin.engine.drift import read_status
from cniplugin.kernel import netns as _netns
from cniplugin.lab.runtime import PluginEnv
from cniplugin.lab.topology import OverlayLab
from harness.cli import cli
from harness.host import require_root, wait_until
from harness.lab import NAMES
from harness.plugin import Rig, assert_cni_error
from harness.resident import Resident

pytestmark = [pytest.mark.netns]

METRICS = "127.0.0.1:9731"
PROBES = {"detectGateway": True, "detectIPConflict": True,
          "detectOptions": {"retries": 2, "timeout": "300ms"}}
POD_ARGS = "IgnoreUnknown=true;K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=trainer-0"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def rig(lab_session: None) -> Iterator[Rig]:
    require_root()
    lab = OverlayLab(NAMES.next(), rails=2, family="4").__enter__()
    try:
        rig = Rig(lab, "resident", server_env={"ROUTE_TUNE_METRICS_ADDRESS": METRICS,
                                               "ROUTE_TUNE_POD_DRIFT_INTERVAL": "1"})
    except BaseException:
        lab.close()
        raise
    try:
        yield rig
    finally:
        rig.close()


def scrape(netns: str, address: str = METRICS) -> Samples:
    """Every sample the engine serves in ``netns``: (name, sorted labels) -> value."""
    fd = _netns.open_netns(f"/run/netns/{netns}")
    try:
        with _netns.entered(fd), urllib.request.urlopen(f"http://{address}/metrics",
                                                         timeout=10) as reply:
            text = reply.read().decode()
    finally:
        os.close(fd)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def series(samples: Samples, name: str, **match: str) -> dict[tuple, float]:
    """The samples of ``name`` whose labels include ``match``, keyed by their other labels."""
    out = {}
    for (sample, labels), value in samples.items():
        found = dict(labels)
        if sample == name and all(found.get(k) == v for k, v in match.items()):
            out[tuple((k, v) for k, v in labels if k not in match)] = value
    return out


def delta(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in {*before, *after}
            if after.get(k, 0) != before.get(k, 0)}


def watched(samples: Samples) -> dict[str, dict]:
    return {
        "requests": series(samples, "route_tune_requests_total", via="resident"),
        "latency": series(samples, "route_tune_request_duration_seconds_count"),
        "phases": series(samples, "route_tune_phase_duration_seconds_count"),
        "probes": series(samples, "route_tune_probes_total"),
        "attachments": series(samples, "route_tune_attachments"),
    }


def test_requests_phases_and_probes_are_counted_exactly(rig):
    """A real ADD, CHECK and DEL, then an ADD whose gateway is down (code 11) and one whose
    address another host holds (code 101): every series moves by exactly what was done."""
    lab = rig.lab
    prev = rig.bare().add(1)
    before = watched(scrape(lab.node))
    assert rig.rt("ADD", 1, prev, keys=PROBES).code == 0
    mid = watched(scrape(lab.node))
    assert rig.rt("CHECK", 1, prev, keys=PROBES).code == 0
    assert rig.rt("DEL", 1, prev, keys=PROBES).code == 0
    lab.ip(lab.gw(1), "link", "set", "rail", "down")
    try:
        assert_cni_error(rig.rt("ADD", 1, prev, keys=PROBES), 11)
    finally:
        lab.ip(lab.gw(1), "link", "set", "rail", "up")
    pod_ip = prev["ips"][0]["address"]
    lab.ip(lab.gw(1), "addr", "add", pod_ip, "dev", "rail")
    try:
        assert_cni_error(rig.rt("ADD", 1, prev, keys=PROBES), 101)
    finally:
        lab.ip(lab.gw(1), "addr", "del", pod_ip, "dev", "rail")
    after = watched(scrape(lab.node))

    assert delta(before["attachments"], mid["attachments"]) == {(): 1}
    cmd = lambda c: (("command", c),)  # noqa: E731
    assert {name: delta(before[name], after[name]) for name in before} == {
        "requests": {(("code", "0"), ("command", "ADD")): 1,
                     (("code", "0"), ("command", "CHECK")): 1,
                     (("code", "0"), ("command", "DEL")): 1,
                     (("code", "11"), ("command", "ADD")): 1,
                     (("code", "101"), ("command", "ADD")): 1},
        "latency": {cmd("ADD"): 3, cmd("CHECK"): 1, cmd("DEL"): 1},
        "phases": {**{(("command", "ADD"), ("phase", p)): 3
                      for p in ("gather", "plan", "apply", "probe")},
                   (("command", "ADD"), ("phase", "announce")): 1,
                   (("command", "CHECK"), ("phase", "gather")): 1,
                   (("command", "DEL"), ("phase", "apply")): 1},
        "probes": {(("outcome", "ok"),): 1, (("outcome", "gateway_unreachable"),): 1,
                   (("outcome", "ip_conflict"),): 1},
        "attachments": {},
    }


def test_build_info_and_bounded_labels(rig):
    """``route_tune_build_info`` carries the version; no route-tune series has a per-pod label."""
    samples = scrape(rig.lab.node)
    assert series(samples, "route_tune_build_info") == {(("version", __version__),): 1.0}
    labels = {k for (name, found), _ in samples.items() if name.startswith("route_tune_")
              for k, _ in found}
    assert labels == {"command", "code", "via", "phase", "outcome", "version", "le"}


def test_in_process_requests_are_exported_and_two_engines_share_the_address(rig, tmp_path):
    """Requests served in-process while no engine runs are counted in the state dir; a second
    engine with that state dir exports them exactly, and shares the first engine's metrics
    address (an upgrade's surge pod): scrapes work before, while both run, and after one exits."""
    lab = rig.lab
    cold = PluginEnv(tmp_path / "cold", family="4", env={"ROUTE_TUNE_ENGINE": "inprocess"})
    env = {**rig.env("STATUS", "net1"), **cold.env}
    for _ in range(2):
        assert rig.exec_plugin(env, rig.conf(1, cni_version="1.1.0")).code == 0
    for command in ("ADD", "CHECK"):
        assert_cni_error(rig.exec_plugin({**env, "CNI_COMMAND": command},
                                         {**rig.conf(1), "podRPFilter": 7}), 7)
    served_cold = {(("code", "0"), ("command", "STATUS")): 2.0,
                   (("code", "7"), ("command", "ADD")): 1.0,
                   (("code", "7"), ("command", "CHECK")): 1.0}

    first = series(scrape(lab.node), "route_tune_requests_total", via="in-process")
    assert first == {}  # the module's engine has its own state dir: none ran cold there
    second = Resident(lab.node, cold, extra_env={"ROUTE_TUNE_METRICS_ADDRESS": METRICS,
                                                 "ROUTE_TUNE_POD_DRIFT_INTERVAL": "0"},
                      ).start()
    try:
        seen: list[dict] = []

        def both_answered() -> bool:
            seen.append(series(scrape(lab.node), "route_tune_requests_total", via="in-process"))
            return {} in seen and served_cold in seen
        wait_until(both_answered, what="scrapes answered by both engines on one address")
        assert all(s in ({}, served_cold) for s in seen), seen
    finally:
        assert second.stop() == 0, second.log()
    for _ in range(20):  # the survivor answers every scrape
        assert series(scrape(lab.node), "route_tune_requests_total", via="in-process") == {}
    assert rig.server is not None and rig.server.alive()


@pytest.mark.parametrize("engine", ["inprocess"], indirect=True)
def test_in_process_adds_are_counted_in_the_configured_state_dir(make_rig):
    """Real requests served in-process (no engine running): an ADD that fails with code 11 (its
    gateway down), one that succeeds and the DEL after it are counted under their command and
    code in the node defaults' stateDir, where the engine reads them (the files read back)."""
    rig = make_rig(rails=2)
    lab = rig.lab
    prev = rig.bare().add(1)
    lab.ip(lab.gw(1), "link", "set", "rail", "down")
    try:
        assert_cni_error(rig.rt("ADD", 1, prev, keys=PROBES), 11)
    finally:
        lab.ip(lab.gw(1), "link", "set", "rail", "up")
    assert rig.rt("ADD", 1, prev, keys=PROBES).code == 0
    assert rig.rt("DEL", 1, prev, keys=PROBES).code == 0
    counts = rig.penv.state_dir / "requests-in-process"
    assert {f.name: f.stat().st_size for f in counts.iterdir()} == {
        "ADD.11": 1, "ADD.0": 1, "DEL.0": 1}


def test_pod_drift_is_reported_and_the_pod_left_alone(rig):
    """Drift made in the pod (its source rule deleted) is reported by the engine's periodic
    check: a warning naming the pod, the drift metrics, and ``show``; the pod is not rewritten."""
    lab = rig.lab
    prev = rig.bare().add(2)
    extra = {"CNI_ARGS": POD_ARGS}
    assert rig.rt("ADD", 2, prev, extra_env=extra).code == 0
    state_dir = str(rig.penv.state_dir)
    try:
        started = (read_status(state_dir) or {}).get("checked_at", 0)
        wait_until(lambda: (read_status(state_dir) or {}).get("checked_at", 0) > started,
                   what="a pod drift round after ADD")
        assert read_status(state_dir)["drifted"] == []
        before = watched_drift(scrape(lab.node))
        pod_ip = prev["ips"][0]["address"].split("/")[0]
        rule = lab.ip(lab.pod, "rule", "show", "from", pod_ip).strip()
        table = re.search(r"lookup (\d+)", rule).group(1)
        lab.ip(lab.pod, "rule", "del", "from", pod_ip, "lookup", table, "pref", "31000")
        drifted = rig.snapshot()
        wait_until(lambda: read_status(state_dir)["drifted"], what="the drift to be reported")
        found = read_status(state_dir)
        last = found["checked_at"]
        wait_until(lambda: read_status(state_dir)["checked_at"] > last,
                   what="one more round over the drifted pod")
        after = watched_drift(scrape(lab.node))
        rig.assert_unchanged(drifted, "the engine rewrote the pod")

        expected = f"pod: missing: ip rule add from {pod_ip}/32 lookup {table} pref 31000 proto 231"
        entry = found["drifted"][0]
        assert {k: v for k, v in entry.items() if k != "found_at"} == {
            "container_id": rig.container_id, "ifname": "net2", "network": rig.conf(2)["name"],
            "pod_namespace": "team-a", "pod_name": "trainer-0", "netns": lab.pod_netns,
            "netns_inode": os.stat(lab.pod_netns).st_ino, "drifts": [expected]}
        assert delta(before, after) == {("found", ()): 1, ("drifted", ()): 1}
        warnings = [line for line in rig.server.log().splitlines() if "pod drift:" in line]
        assert len(warnings) == 1, warnings
        assert warnings[0].endswith(
            f"pod drift: pod team-a/trainer-0 (attachment {rig.container_id}/net2, network "
            f"{rig.conf(2)['name']}): 1 route-tune object(s) in the pod differ from the record: "
            f"{expected}; route-tune does not rewrite a pod: find what changed it, then "
            f"recreate the pod (or DEL and ADD the attachment)"), warnings[0]

        utc = lambda t: time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))  # noqa: E731
        first = read_status(state_dir)
        shown_out = cli("show", "--netns", lab.pod_netns, defaults=rig.penv.defaults_file).out
        status = read_status(state_dir)
        engine_part = next(p for p in shown_out.split("\n\n") if p.startswith("pod drift found"))
        # Rounds go on every second: show printed one between the two reads around it.
        shown_at = re.search(r"last check ([^,]+),", engine_part).group(1)
        assert utc(first["checked_at"]) <= shown_at <= utc(status["checked_at"]), shown_at
        assert engine_part == (
            f"pod drift found by the resident engine (last check {shown_at}, "
            f"{status['checked']} attachment(s) on the node compared):\n"
            f"  pod team-a/trainer-0, attachment {rig.container_id}/net2 (network "
            f"{rig.conf(2)['name']}), drifted since {utc(entry['found_at'])}:\n"
            f"    {expected}"), shown_out
    finally:
        assert rig.rt("DEL", 2, prev, extra_env=extra).code == 0


def watched_drift(samples: Samples) -> dict:
    return {("found", ()): samples.get(("route_tune_pod_drift_found_total", ()), 0),
            ("drifted", ()): samples.get(("route_tune_pod_drift_attachments", ()), 0)}


def test_engine_without_metrics_address_listens_on_no_tcp_port(rig, tmp_path):
    """No ``--metrics-address``: the metrics listener is off by default."""
    plain = Resident(rig.lab.node, PluginEnv(tmp_path / "plain", family="4"),
                     extra_env={"ROUTE_TUNE_POD_DRIFT_INTERVAL": "0"}).start()
    try:
        sockets = set()
        for name in os.listdir(f"/proc/{plain.pid}/fd"):
            target = os.readlink(f"/proc/{plain.pid}/fd/{name}")
            if target.startswith("socket:["):
                sockets.add(target[len("socket:["):-1])
        listening = set()
        for table in ("tcp", "tcp6"):
            for line in open(f"/proc/{plain.pid}/net/{table}").read().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    listening.add(fields[9])
        assert sockets and not sockets & listening
    finally:
        assert plain.stop() == 0, plain.log()
