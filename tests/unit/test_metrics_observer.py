"""The metrics without a kernel: the observer's mapping of engine events to series, the
in-process counts in the state dir, and the metrics address syntax."""

from __future__ import annotations

import json
import threading

import pytest
from hypothesis import given, strategies as st

from cniplugin.transport import inprocess_counts
from cniplugin.transport.metrics import EngineMetrics, parse_address


def samples(metrics: EngineMetrics, prefix: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in metrics.registry.collect() for s in family.samples
            if s.name.startswith(prefix) and not s.name.endswith("_created")}


def test_events_become_bounded_series(tmp_path):
    metrics = EngineMetrics(str(tmp_path))
    for name, fields in [("repair", {"kind": "rule"}), ("repair", {"kind": "rule"}),
                         ("repair", {"kind": "route"}), ("repair_backoff", {"kind": "route"}),
                         ("repair", {"kind": "Not a kind!"}), ("probe", {"outcome": "ok"}),
                         ("probe", {"outcome": "made-up"}), ("unknown", {"kind": "rule"}),
                         ("pod_drift", {"attachments": 2, "new": 2}),
                         ("pod_drift", {"attachments": 1, "new": 0})]:
        metrics.event(name, fields)
    metrics.phase("ADD", "gather", 0.002)
    metrics.phase("ADD", "not-a-phase", 0.002)
    metrics.request("BOGUS", None, 0.01)
    metrics.request("ADD", 11, 0.01)
    metrics.request("ADD", 0, 0.01)
    metrics.request("ADD", 1000, 0.01)
    assert samples(metrics, "route_tune_node") == {
        ("route_tune_node_repairs_total", (("kind", "rule"),)): 2.0,
        ("route_tune_node_repairs_total", (("kind", "route"),)): 1.0,
        ("route_tune_node_repair_backoffs_total", (("kind", "route"),)): 1.0}
    assert samples(metrics, "route_tune_probes") == {
        ("route_tune_probes_total", (("outcome", "ok"),)): 1.0,
        ("route_tune_probes_total", (("outcome", "gateway_unreachable"),)): 0.0,
        ("route_tune_probes_total", (("outcome", "ip_conflict"),)): 0.0}
    assert samples(metrics, "route_tune_pod_drift") == {
        ("route_tune_pod_drift_attachments", ()): 1.0,
        ("route_tune_pod_drift_found_total", ()): 2.0}
    assert {k: v for k, v in samples(metrics, "route_tune_phase").items()
            if k[0].endswith("_count")} == {
        ("route_tune_phase_duration_seconds_count", (("command", "ADD"), ("phase", "gather"))): 1}
    assert samples(metrics, "route_tune_requests") == {
        ("route_tune_requests_total", (("code", "other"), ("command", "other"),
                                       ("via", "resident"))): 1,
        ("route_tune_requests_total", (("code", "other"), ("command", "ADD"),
                                       ("via", "resident"))): 1,
        ("route_tune_requests_total", (("code", "11"), ("command", "ADD"),
                                       ("via", "resident"))): 1,
        ("route_tune_requests_total", (("code", "0"), ("command", "ADD"),
                                       ("via", "resident"))): 1}


def test_in_process_counts_are_exact_under_concurrency(tmp_path):
    """Plugins counting at once lose nothing, whether they name the state dir (an Invocation was
    built) or fall back to the node defaults' (the request failed before); the engine reads what
    they left, and so does its attachments gauge (state files, not parsed)."""
    defaults = tmp_path / "defaults.json"
    defaults.write_text(json.dumps({"stateDir": str(tmp_path / "state")}))
    environ = {"ROUTE_TUNE_DEFAULTS": str(defaults)}

    def plugin(i: int) -> None:
        state_dir = str(tmp_path / "state") if i % 4 < 2 else None
        for _ in range(25):
            inprocess_counts.record_outcome(environ, "ADD", 0 if i % 2 else 7, state_dir)
    threads = [threading.Thread(target=plugin, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    inprocess_counts.record_outcome(environ, "NOPE", 0, None)
    assert inprocess_counts.read_counts(str(tmp_path / "state")) == {
        ("ADD", "0"): 100, ("ADD", "7"): 100, ("other", "0"): 1}
    (tmp_path / "state/attachments/c1").mkdir(parents=True)
    for name in ("net1.json", "net2.json", "net2.json.tmp.1"):
        (tmp_path / "state/attachments/c1" / name).write_text("{}")
    metrics = EngineMetrics(str(tmp_path / "state"))
    assert samples(metrics, "route_tune_attachments") == {("route_tune_attachments", ()): 2}
    assert samples(metrics, "route_tune_requests") == {
        ("route_tune_requests_total", (("code", "0"), ("command", "ADD"),
                                       ("via", "in-process"))): 100,
        ("route_tune_requests_total", (("code", "7"), ("command", "ADD"),
                                       ("via", "in-process"))): 100,
        ("route_tune_requests_total", (("code", "0"), ("command", "other"),
                                       ("via", "in-process"))): 1}


def test_an_unusable_state_dir_never_fails_the_request(tmp_path):
    (tmp_path / "file").write_text("")
    defaults = tmp_path / "defaults.json"
    defaults.write_text(json.dumps({"stateDir": str(tmp_path / "file" / "state")}))
    inprocess_counts.record_outcome({"ROUTE_TUNE_DEFAULTS": str(defaults)}, "ADD", 0, None)
    inprocess_counts.record_outcome({}, "ADD", 0, str(tmp_path / "file" / "state"))
    assert inprocess_counts.read_counts(str(tmp_path / "file" / "state")) == {}


@pytest.mark.parametrize("code, label", [(0, "0"), (1, "1"), (11, "11"), (999, "999"),
                                         (1000, "other"), (-1, "other"), (None, "other")])
def test_code_labels(code, label):
    assert inprocess_counts.code_label(code) == label


@pytest.mark.parametrize("text, address", [
    ("0.0.0.0:9731", ("0.0.0.0", 9731)), (":9731", ("0.0.0.0", 9731)),
    ("[::]:9731", ("::", 9731)), ("fd00::1:80", ("fd00::1", 80)),
    ("127.0.0.1:65535", ("127.0.0.1", 65535))])
def test_metrics_address(text, address):
    assert parse_address(text) == address


#: What may stand before the last colon (any text: the port alone decides).
HOSTS = st.sampled_from(["", "0.0.0.0", "[::]", "fd00::1", "localhost"]) | st.text(max_size=12)
#: A port that is no decimal number of ASCII digits: empty, signs, spaces, letters, and digits
#: that str.isdigit() takes but a port is not written in ("²", Arabic-Indic "٨٠", fullwidth "８").
NOT_DIGITS = st.sampled_from(["", "+80", "-1", " 80", "80 ", "8o", "0x50", "1e3", "80.0", "²",
                              "٨٠", "８０", "¹²³"]) | st.text(min_size=1, max_size=8).filter(
    lambda t: ":" not in t and not (t.isascii() and t.isdigit()))
#: Numbers of ASCII digits outside 1..65535 (leading zeros included).
OUT_OF_RANGE = st.sampled_from(["0", "00", "65536", "99999"]) | st.integers(65536, 10**12).map(str)


@given(st.text(max_size=20).filter(lambda t: ":" not in t))
def test_a_metrics_address_without_a_colon_is_refused(text):
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        parse_address(text)


@given(HOSTS, NOT_DIGITS | OUT_OF_RANGE)
def test_a_metrics_address_whose_port_is_no_port_is_refused(host, port):
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        parse_address(f"{host}:{port}")


@pytest.mark.parametrize("text", ["a:²", "x:٨٠", "x:８０", "127.0.0.1:0", "[::]:65536", ":", "9731"])
def test_a_metrics_address_with_a_port_not_in_ascii_digits_or_out_of_range_is_refused(text):
    """Both "²" and "٨٠" pass str.isdigit(): the first made int() raise its own message, the
    second was taken as port 80."""
    with pytest.raises(ValueError, match=r"^metrics address .* is not HOST:PORT \(e\.g\. 0\.0\.0\.0:9731\)$"):
        parse_address(text)
