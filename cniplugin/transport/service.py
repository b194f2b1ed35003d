"""``cni-route-tune serve``: the resident engine as a node service.

Its options, its start-up (warm-up, then the socket: bound anew or taken over from a running
engine, ``transport.handover``), the work it runs beside serving (node repair, the pod drift
check, the metrics listener) and its shutdown. The socket server itself is ``transport.server``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import threading
import time

from cniplugin.protocol import log as _logging
from cniplugin.transport import handover as _handover
from cniplugin.transport import shim as _shim
from cniplugin.transport.inprocess_counts import node_state_dir
from cniplugin.transport.server import DEFAULT_THREADS, Runner, Server

__all__ = ["METRICS_ADDRESS_ENV", "POD_DRIFT_INTERVAL_ENV", "build_parser", "main", "serve",
           "warm_up"]

log = logging.getLogger("cniplugin.server")

#: The serve options a DaemonSet may set through the environment instead of arguments.
METRICS_ADDRESS_ENV = "ROUTE_TUNE_METRICS_ADDRESS"
POD_DRIFT_INTERVAL_ENV = "ROUTE_TUNE_POD_DRIFT_INTERVAL"



#: A canned ``mode: disabled`` ADD: it walks env parsing, config and prevResult validation and
#: result encoding, so every pydantic model is built before the first real request.
_WARM_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "route-tune-warm-up", "CNI_IFNAME": "net1",
             "CNI_NETNS": "/proc/self/ns/net", "CNI_PATH": "/opt/cni/bin"}
_WARM_STDIN = json.dumps({
    "cniVersion": "1.0.0", "name": "route-tune-warm-up", "type": "route-tune", "mode": "disabled",
    "prevResult": {"cniVersion": "1.0.0",
                   "interfaces": [{"name": "net1", "mac": "02:00:00:00:00:01", "sandbox": "x"}],
                   "ips": [{"address": "192.0.2.2/24", "gateway": "192.0.2.1", "interface": 0}],
                   "routes": [{"dst": "0.0.0.0/0", "gw": "192.0.2.1"}]},
}).encode()


def warm_up(runner: Runner) -> None:
    """Load the engine (pyroute2 with it) and build the models now, so the first request is fast."""
    started = time.monotonic()
    for name in ("protocol.config", "protocol.wire", "engine.commands", "kernel.netlink"):
        try:
            importlib.import_module(f"cniplugin.{name}")
        except ImportError as exc:  # serving still works; that module loads on first use
            log.warning("warm-up could not import %s: %s", name, exc)
    out = runner(dict(_WARM_ENV, **_node_env()), _WARM_STDIN)
    if out.exit_code != 0:
        log.warning("warm-up request failed: %s", out.stdout.decode(errors="replace"))
    log.info("warm-up done in %.0f ms", (time.monotonic() - started) * 1000)


def _node_env() -> dict[str, str]:
    # The warm-up request reads the same node defaults file as the real ones.
    return {k: v for k, v in os.environ.items() if k == "ROUTE_TUNE_DEFAULTS"}


def serve(socket_path: str = _shim.DEFAULT_SOCKET, *, threads: int = DEFAULT_THREADS,
          runner: Runner | None = None, ready_file: str | None = None,
          after_handover: str = "exit", repair=None, metrics_address: str = "",
          pod_drift_interval: float = 0.0) -> int:
    """Run the resident engine until SIGTERM/SIGINT or a successor takes its socket; returns the
    exit status (0 = clean stop, also after a handover).

    ``runner`` replaces ``transport.plugin.serve_request`` (tests only); the default is the real
    engine. ``ready_file`` exists while this engine owns the socket (a readiness probe's signal).
    ``after_handover="wait"`` stays idle after a handover until SIGTERM (under a DaemonSet, an
    exit would make the kubelet restart the old pod's engine, which would take the socket back).
    ``repair``: the node repair's ``engine.repair.Settings`` (None: no repair).
    ``metrics_address`` (HOST:PORT, empty: none) serves Prometheus metrics;
    ``pod_drift_interval`` (seconds, 0: never) compares every attachment's pod side with its
    record (``engine.drift``).
    """
    if runner is None:
        from cniplugin.transport.plugin import serve_request as runner
    state_dir = node_state_dir(os.environ)
    metrics = None
    if metrics_address:
        from cniplugin.transport import metrics as _metrics
        try:
            metrics = _metrics.start(metrics_address, state_dir)
        except (OSError, ValueError) as exc:
            log.error("cannot serve metrics on %s: %s", metrics_address, exc)
            return 1
        log.info("metrics on http://%s/metrics", metrics_address)
    server = Server(socket_path, threads=threads, runner=runner,
                    on_reply=metrics.metrics.request if metrics is not None else None)
    terminated = threading.Event()

    def on_signal(*_: object) -> None:
        terminated.set()
        server.stop()

    # Handlers first: a SIGTERM during warm-up or bind is a clean stop too (the pipe remembers it).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    # A running engine serves on while this one warms up, so a handover costs only the exchange;
    # with none running, listen first: callers then wait in the backlog instead of failing.
    taking_over = _handover.engine_answers(socket_path)
    if taking_over:
        warm_up(runner)
    try:
        server.bind()
    except OSError as exc:
        log.error("cannot listen on %s: %s", socket_path, exc)
        return 1
    if not taking_over:
        warm_up(runner)
    log.info("resident engine serving on %s (pid %d, %d threads)", socket_path, os.getpid(),
             threads)
    background = _start_background(state_dir, repair, pod_drift_interval)
    _set_ready(ready_file, True)
    try:
        server.serve_forever()
    finally:
        _set_ready(ready_file, False)
        # A successor (with its own metrics listener on the shared port) takes over from here.
        for task in background:
            task.stop()
        if metrics is not None:
            metrics.stop()
    if server.handed_over and after_handover == "wait":
        log.info("handed over; idle until SIGTERM")
        while not terminated.wait(1.0):
            pass
    # Already stopping: a repeated signal must not kill the interpreter while it tears down.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    return 0


def _start_background(state_dir: str, repair, pod_drift_interval: float) -> list:
    """The engine's own loops, each with a ``stop()``: node repair and the pod drift check."""
    tasks = []
    if repair is not None:
        from cniplugin.engine import repair as _repair
        tasks.append(_repair.start(state_dir, repair))
    if pod_drift_interval:
        from cniplugin.engine.drift import PodDriftChecker
        drift = PodDriftChecker(state_dir, pod_drift_interval)
        drift.start()
        tasks.append(drift)
    return tasks


def _set_ready(path: str | None, ready: bool) -> None:
    if path is None:
        return
    if not ready:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    with open(path, "w", encoding="ascii") as out:
        out.write(f"{os.getpid()}\n")


def build_parser() -> argparse.ArgumentParser:
    """``serve``'s options (the DaemonSet's arguments are checked against it)."""
    parser = argparse.ArgumentParser(prog="cni-route-tune serve",
                                     description="Run the resident route-tune engine.")
    parser.add_argument("--socket", default=None,
                        help=f"unix socket path (default: $ROUTE_TUNE_SOCKET or "
                             f"{_shim.DEFAULT_SOCKET})")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="requests served concurrently (default %(default)s)")
    parser.add_argument("--ready-file", default=None,
                        help="a file that exists while this engine owns the socket (for a "
                             "readiness probe; keep it outside the shared socket directory)")
    parser.add_argument("--after-handover", choices=("exit", "wait"), default="exit",
                        help="once a new engine took the socket and in-flight requests are "
                             "done: exit 0, or wait idle for SIGTERM (under a DaemonSet) "
                             "(default %(default)s)")
    parser.add_argument("--no-repair", action="store_true",
                        help="do not repair node objects that something else removed")
    parser.add_argument("--reconcile-interval", type=float, default=60.0, metavar="SECONDS",
                        help="full node reconcile every SECONDS, +-10%% jitter (default 60)")
    parser.add_argument("--repair-backoff-max", type=float, default=300.0, metavar="SECONDS",
                        help="longest pause before repairing an object that keeps being "
                             "removed (default 300)")
    parser.add_argument("--metrics-address", metavar="HOST:PORT",
                        default=os.environ.get(METRICS_ADDRESS_ENV, ""),
                        help=f"serve Prometheus metrics at http://HOST:PORT/metrics ([v6]:PORT "
                             f"for IPv6; default: ${METRICS_ADDRESS_ENV}, else none); the port is "
                             f"shared with a second engine during an upgrade (SO_REUSEPORT)")
    parser.add_argument("--pod-drift-interval", metavar="SECONDS", type=_drift_interval,
                        default=os.environ.get(POD_DRIFT_INTERVAL_ENV, "60"),
                        help=f"compare every attachment's pod side with its record this often "
                             f"(±10%% jitter; at least 1; 0: never; default: "
                             f"${POD_DRIFT_INTERVAL_ENV}, else 60)")
    return parser


def _drift_interval(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if seconds != 0 and not 1 <= seconds <= 86400:
        raise argparse.ArgumentTypeError(f"{text}: 0 (never) or 1 to 86400 seconds")
    return seconds


def main(argv: list[str] | None = None) -> int:
    """``cni-route-tune serve``: see ``build_parser``."""
    args = build_parser().parse_args(argv)
    from cniplugin.transport.pydantic_setup import disable_plugin_discovery
    disable_plugin_discovery()
    _setup_logging()
    from cniplugin.engine.repair import Settings
    repair = None if args.no_repair else Settings(
        reconcile_interval=max(1.0, args.reconcile_interval),
        backoff_max=max(1.0, args.repair_backoff_max))
    return serve(args.socket or _shim.socket_path(os.environ), threads=args.threads,
                 ready_file=args.ready_file, after_handover=args.after_handover, repair=repair,
                 metrics_address=args.metrics_address,
                 pod_drift_interval=args.pod_drift_interval)


def _setup_logging() -> None:
    """The plugin's handlers; a daemon's stderr is its container log, so INFO goes there too."""
    level = os.environ.get(_logging.STDERR_LEVEL_ENV) or "info"
    _logging.setup({_logging.STDERR_LEVEL_ENV: level})


if __name__ == "__main__":
    import sys
    sys.exit(main())
