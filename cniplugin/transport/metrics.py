"""The resident engine's Prometheus metrics: what it counts, and the HTTP listener that serves them.

Only the resident engine loads this module (``cni-route-tune serve --metrics-address``); the
one-shot plugin never imports ``prometheus_client``. The engine reports through
``engine.observe`` (phase timings, events); this module is the observer that turns those reports,
and the server's per-request callback, into metrics. Names, labels and meaning: docs/metrics.md.

Cardinality is bounded by construction: every label value comes from a small fixed set (commands,
CNI result codes, phases, probe outcomes, node object kinds); nothing names a pod.

The listener sets ``SO_REUSEPORT`` so that a second engine (an upgrade's surge pod) can bind the
same address while the first one still serves: the kernel spreads new scrapes over both, and when
one closes its listener the other keeps answering.
"""

from __future__ import annotations

import os
import re
import socket
import socketserver
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info,
                               ProcessCollector, make_wsgi_app)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

from cniplugin._version import __version__
from cniplugin.engine import observe
from cniplugin.transport.inprocess_counts import code_label, command_label, read_counts

__all__ = ["PREFIX", "EngineMetrics", "MetricsListener", "parse_address", "start"]

PREFIX = "route_tune"
#: CNI request latencies span a disabled pass-through (sub-millisecond) to probes that wait
#: seconds for a gateway.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PROBE_OUTCOMES = ("ok", "gateway_unreachable", "ip_conflict")
_KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")


class EngineMetrics(observe.Observer):
    """Every metric of one engine process, in its own registry."""

    def __init__(self, state_dir: str, registry: CollectorRegistry | None = None) -> None:
        self.state_dir = state_dir
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._served: dict[tuple[str, str], int] = {}
        self._served_mu = threading.Lock()
        self.request_seconds = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time the resident engine took to serve a CNI request, by command",
            ["command"], buckets=LATENCY_BUCKETS, registry=r)
        self.phase_seconds = Histogram(
            f"{PREFIX}_phase_duration_seconds",
            "Time of one phase (gather, plan, apply, probe, announce) of a command",
            ["command", "phase"], buckets=LATENCY_BUCKETS, registry=r)
        self.probes = Counter(
            f"{PREFIX}_probes", "ADD's address probes by outcome (a failed one fails the ADD)",
            ["outcome"], registry=r)
        self.repairs = Counter(
            f"{PREFIX}_node_repairs", "Node objects restored after something removed or "
            "changed them, by object kind", ["kind"], registry=r)
        self.repair_backoffs = Counter(
            f"{PREFIX}_node_repair_backoffs", "Times node repair paused for an object deleted "
            "again and again, by object kind", ["kind"], registry=r)
        self.pod_drifted = Gauge(
            f"{PREFIX}_pod_drift_attachments",
            "Recorded attachments whose pod side differed from their record at the last check",
            registry=r)
        self.pod_drift_found = Counter(
            f"{PREFIX}_pod_drift_found", "Attachments found drifted in their pod (each counted "
            "once per episode: when a check first finds it drifted)", registry=r)
        Info(f"{PREFIX}_build", "route-tune build", registry=r).info({"version": __version__})
        ProcessCollector(registry=r)
        r.register(_StateCollector(self))
        for outcome in PROBE_OUTCOMES:
            self.probes.labels(outcome)  # present at 0: rate() works from the first probe

    # -- the server's per-request callback --------------------------------------------------
    def request(self, command: str, code: int | None, seconds: float) -> None:
        """One request the server answered: ``code`` is its CNI result code (0 = success), as
        dispatch's ``Outcome`` carries it."""
        command = command_label(command)
        key = (command, code_label(code))
        with self._served_mu:
            self._served[key] = self._served.get(key, 0) + 1
        self.request_seconds.labels(command).observe(seconds)

    def served(self) -> dict[tuple[str, str], int]:
        with self._served_mu:
            return dict(self._served)

    # -- engine.observe ---------------------------------------------------------------------
    def phase(self, command: str, phase: str, seconds: float) -> None:
        if phase in observe.PHASES:
            self.phase_seconds.labels(command_label(command), phase).observe(seconds)

    def event(self, name: str, fields: dict[str, object]) -> None:
        if name == "probe" and fields.get("outcome") in PROBE_OUTCOMES:
            self.probes.labels(fields["outcome"]).inc()
        elif name in ("repair", "repair_backoff"):
            kind = fields.get("kind")
            if isinstance(kind, str) and _KIND_RE.match(kind):
                (self.repairs if name == "repair" else self.repair_backoffs).labels(kind).inc()
        elif name == "pod_drift":
            drifted, new = fields.get("attachments"), fields.get("new", 0)
            if isinstance(drifted, int):
                self.pod_drifted.set(drifted)
            if isinstance(new, int) and new > 0:
                self.pod_drift_found.inc(new)


class _StateCollector:
    """What is read at scrape time: the requests counter (the engine's own and the in-process
    counts in the state dir) and the attachments recorded in the state dir."""

    def __init__(self, metrics: EngineMetrics) -> None:
        self._metrics = metrics

    def describe(self):
        return [CounterMetricFamily(f"{PREFIX}_requests", "", labels=()),
                GaugeMetricFamily(f"{PREFIX}_attachments", "")]

    def collect(self):
        requests = CounterMetricFamily(
            f"{PREFIX}_requests", "CNI requests by command and result code (0 = success, else "
            "the CNI error code); via: resident = served by this engine process, in-process = "
            "served while no engine was up (counted in the state dir)",
            labels=("command", "code", "via"))
        for (command, code), count in sorted(self._metrics.served().items()):
            requests.add_metric((command, code, "resident"), count)
        for (command, code), count in sorted(read_counts(self._metrics.state_dir).items()):
            requests.add_metric((command, code, "in-process"), count)
        yield requests
        yield GaugeMetricFamily(f"{PREFIX}_attachments",
                                "Attachments recorded in the state dir (state files)",
                                value=_recorded_attachments(self._metrics.state_dir))


def _recorded_attachments(state_dir: str) -> int:
    """State files under ``<stateDir>/attachments/<container>/``: a directory walk, no parsing."""
    root = os.path.join(state_dir, "attachments")
    count = 0
    try:
        containers = [e.path for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return 0
    for path in containers:
        try:
            count += sum(1 for e in os.scandir(path) if e.name.endswith(".json"))
        except OSError:
            continue
    return count


# ----------------------------------------------------------------------------------------------
# the HTTP listener


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6; an empty host means every IPv4 address)."""
    host, sep, port = text.rpartition(":")
    # ASCII digits only: str.isdigit() also takes "²" (which int() refuses) and "٨٠" (= 80).
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"metrics address {text!r} is not HOST:PORT (e.g. 0.0.0.0:9731)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


class _SharedPortServer(ThreadingWSGIServer):
    """A threaded WSGI server whose listening socket shares its port (``SO_REUSEPORT``) with
    another engine of the same user, and which binds without a reverse DNS lookup."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]
        self.setup_environ()


class _SharedPortServer6(_SharedPortServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        """A scrape every few seconds is not worth a log line."""


class MetricsListener:
    """``registry`` served over HTTP on ``address`` by a background thread until ``stop()``."""

    def __init__(self, address: str, registry: CollectorRegistry) -> None:
        host, port = parse_address(address)
        server_class = _SharedPortServer6 if ":" in host else _SharedPortServer
        self._httpd = make_server(host, port, make_wsgi_app(registry), server_class,
                                  _QuietHandler)
        self.address = self._httpd.server_address
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        name="route-tune-metrics")
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


class MetricsService:
    """The engine's metrics, installed as the engine's observer and served on an address."""

    def __init__(self, metrics: EngineMetrics, listener: MetricsListener) -> None:
        self.metrics, self.listener = metrics, listener

    def stop(self) -> None:
        self.listener.stop()
        observe.install(None)


def start(address: str, state_dir: str) -> MetricsService:
    """Count the engine's work from now on and serve it on ``address`` (raises OSError or
    ValueError when the address cannot be used)."""
    metrics = EngineMetrics(state_dir)
    listener = MetricsListener(address, metrics.registry)
    observe.install(metrics)
    return MetricsService(metrics, listener)
