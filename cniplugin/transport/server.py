"""The resident engine: ``cni-route-tune serve``.

A unix-socket server that keeps the engine (pyroute2, pydantic models) loaded and answers the
forwarding shim (``transport.shim``) of the ``route-tune`` executable. Wire format and security model:
``docs/resident.md``. In short: root-only socket, root-only peers (SO_PEERCRED), one thread per
connection, requests for the same pod netns serialised, every received fd closed, and no request -
however malformed - ends the server.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import importlib
import json
import logging
import os
import select
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from cniplugin.protocol import log as _logging
from cniplugin.transport import shim as _shim
from cniplugin.protocol.env import read_node_defaults
from cniplugin.protocol.errors import CNIError, InternalError, IOFailure, UnsafeRequest
from cniplugin.transport.inprocess_counts import node_state_dir
from cniplugin.transport.frames import BadRequest, Mismatch, close_all, error_frame, frame, \
    peer_cred, read_request

log = logging.getLogger("cniplugin.server")

#: A peer has this long to deliver its request and to take the reply (run() itself is untimed).
IO_TIMEOUT = 30.0
DEFAULT_THREADS = 32

#: Test hooks, read from the SERVER's own environment at start (never from a request), set only by
#: tests/kernel/test_server.py: append "enter|exit <netns key> <monotonic ns>" lines to this file around
#: every run, and sleep this many seconds inside the per-netns critical section.
TRACE_ENV = "ROUTE_TUNE_SERVER_TEST_TRACE"
DELAY_ENV = "ROUTE_TUNE_SERVER_TEST_DELAY"

Runner = Callable[..., object]  # _protocol.run's signature
#: Called after every request: (CNI_COMMAND, exit code, stdout, seconds) - the metrics' count.
ReplyHook = Callable[[str, int, bytes, float], None]

#: The serve options a DaemonSet may set through the environment instead of arguments.
METRICS_ADDRESS_ENV = "ROUTE_TUNE_METRICS_ADDRESS"
POD_DRIFT_INTERVAL_ENV = "ROUTE_TUNE_POD_DRIFT_INTERVAL"


# ----------------------------------------------------------------------------------------------
# per-netns serialisation


class KeyedLocks:
    """One lock per key, alive only while someone holds or waits for it (memory stays flat)."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._locks: dict[object, list] = {}

    @contextlib.contextmanager
    def hold(self, key: object) -> Iterator[None]:
        with self._mu:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._mu:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)


# ----------------------------------------------------------------------------------------------
# the server


class Server:
    """Bind, accept, dispatch. ``stop()`` may be called from any thread or a signal handler."""

    def __init__(self, socket_path: str, *, threads: int = DEFAULT_THREADS,
                 runner: Runner, on_reply: ReplyHook | None = None) -> None:
        self.socket_path = socket_path
        self.on_reply = on_reply
        self._slots = threading.BoundedSemaphore(max(1, threads))
        self._runner = runner
        self._netns_locks = KeyedLocks()
        self._workers: set[threading.Thread] = set()
        self._workers_mu = threading.Lock()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._listener: socket.socket | None = None
        self._dir_fd: int | None = None
        self._log_options = _server_log_options()
        self._trace = os.environ.get(TRACE_ENV) or None
        self._delay = float(os.environ.get(DELAY_ENV) or 0)

    # -- lifecycle --------------------------------------------------------------------------

    def bind(self) -> None:
        """Create the socket: parent dir 0700, umask 077, a stale socket removed only if dead."""
        parent = os.path.dirname(os.path.abspath(self.socket_path))
        try:
            os.mkdir(parent, 0o700)
        except FileExistsError:
            st = os.stat(parent)
            if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise OSError(errno.EPERM, f"{parent}: must be owned by us and not group/"
                                           f"world-writable") from None
        # One server per directory: flock the directory itself (no lock file left behind).
        self._dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(errno.EADDRINUSE, f"another server holds {parent}") from None
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)  # the socket is never, even briefly, reachable by others
        try:
            sock.bind(self.socket_path)
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        sock.listen(128)
        self._listener = sock

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{self.socket_path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(self.socket_path)
        except ConnectionRefusedError:
            log.info("removing stale socket %s", self.socket_path)
            os.unlink(self.socket_path)
            return
        finally:
            probe.close()
        raise OSError(errno.EADDRINUSE, f"a server already answers on {self.socket_path}")

    def stop(self) -> None:
        """Ask the accept loop to stop (async-signal-safe: one write to a pipe)."""
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")

    def serve_forever(self) -> None:
        """Accept until stop(); then remove the socket and wait for in-flight requests."""
        assert self._listener is not None, "bind() first"
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        try:
            while True:
                self._slots.acquire()  # backpressure: the kernel backlog queues the rest
                ready = {fd for fd, _ in poller.poll()}
                if self._stop_r in ready:
                    self._slots.release()
                    break
                try:
                    conn, _ = self._listener.accept()
                except OSError as exc:  # e.g. EMFILE: keep serving the others
                    self._slots.release()
                    log.warning("accept failed: %s", exc)
                    time.sleep(0.05)
                    continue
                worker = threading.Thread(target=self._worker, args=(conn,), daemon=True,
                                          name="route-tune-request")
                with self._workers_mu:
                    self._workers.add(worker)
                worker.start()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        # Unlink first: new shims then fall back in-process instead of queueing on a dying server.
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)
        if self._listener is not None:
            self._listener.close()
        with self._workers_mu:
            pending = list(self._workers)
        if pending:
            log.info("waiting for %d in-flight request(s)", len(pending))
        for worker in pending:
            worker.join()
        for fd in (self._stop_r, self._stop_w, self._dir_fd):
            if fd is not None:
                os.close(fd)
        log.info("resident engine stopped")

    # -- one connection ---------------------------------------------------------------------

    def _worker(self, conn: socket.socket) -> None:
        try:
            with _logging.request_context({}, self._log_options):
                self.handle(conn)
        except Exception:  # a bug in the handler must never take the server down
            log.exception("request handler failed")
        finally:
            conn.close()
            self._slots.release()
            with self._workers_mu:
                self._workers.discard(threading.current_thread())

    def handle(self, conn: socket.socket) -> None:
        """Serve one connection: check the peer, read, run, reply. Always closes received fds."""
        conn.settimeout(IO_TIMEOUT)
        pid, uid, _ = peer_cred(conn)
        if uid != 0:
            log.warning("refused request from pid %d uid %d: only root may use the engine",
                        pid, uid)
            self._send(conn, error_frame(UnsafeRequest(
                "refused by the resident engine", f"peer uid {uid} is not root")))
            return
        fds: list[int] = []
        try:
            env, stdin, pod_fd, node_fd = read_request(conn, fds)
        except Mismatch as exc:
            close_all(fds)
            log.warning("pid %d speaks another protocol (magic %r)", pid, bytes(exc.args[0]))
            self._send(conn, _shim.MISMATCH + bytes(_shim.HEADER_LEN - 4))
            return
        except BadRequest as exc:
            close_all(fds)
            log.warning("malformed request from pid %d: %s", pid, exc)
            self._send(conn, error_frame(IOFailure("malformed request", str(exc))))
            return
        except OSError as exc:  # timeout or peer gone: nobody to answer
            close_all(fds)
            log.warning("request from pid %d not received: %s", pid, exc)
            return
        except BaseException:
            close_all(fds)
            raise
        try:
            reply = self._run(env, stdin, pod_fd, node_fd)
        finally:
            close_all(fds)
        self._send(conn, reply)

    def _send(self, conn: socket.socket, frame: bytes) -> None:
        try:
            conn.sendall(frame)
        except OSError as exc:
            log.warning("reply not delivered: %s", exc)

    def _run(self, env: Mapping[str, str], stdin: bytes, pod_fd: int | None,
             node_fd: int | None) -> bytes:
        key = None
        if pod_fd is not None:
            st = os.fstat(pod_fd)
            key = (st.st_dev, st.st_ino)
        with self._netns_locks.hold(key) if key else contextlib.nullcontext():
            self._trace_line("enter", key)
            if self._delay:
                time.sleep(self._delay)
            try:
                out = self._call(env, stdin, pod_fd, node_fd)
            finally:
                self._trace_line("exit", key)
        return out

    def _call(self, env: Mapping[str, str], stdin: bytes, pod_fd: int | None,
              node_fd: int | None) -> bytes:
        started = time.monotonic()
        try:
            out = self._runner(env, stdin, pod_netns_fd=pod_fd, node_netns_fd=node_fd)
            stdout, stderr, code = bytes(out.stdout), bytes(out.stderr), int(out.exit_code)
            if not 0 <= code <= 255:
                raise ValueError(f"exit code {code} out of range")
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - any failure is a 999 reply
            log.error("internal error serving %s: %r", env.get("CNI_COMMAND", "?"), exc,
                      exc_info=True)
            reply = error_frame(InternalError("internal error", repr(exc)), stdin)
            self._replied(env, 1, b'{"code": 999}', started)
            return reply
        with _logging.request_context(_logging.request_fields(env), self._log_options):
            log.info("served via resident engine (exit %d)", code)
        self._replied(env, code, stdout, started)
        return frame(code, stdout, stderr)

    def _replied(self, env: Mapping[str, str], code: int, stdout: bytes, started: float) -> None:
        if self.on_reply is not None:
            try:
                self.on_reply(env.get("CNI_COMMAND", ""), code, stdout,
                              time.monotonic() - started)
            except Exception:  # counting must never cost a reply
                log.exception("request metrics failed")

    def _trace_line(self, what: str, key: object) -> None:
        if not self._trace:
            return
        line = f"{what} {key[1] if key else '-'} {time.monotonic_ns()}\n".encode()
        fd = os.open(self._trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line)  # one short O_APPEND write: atomic between threads
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------------------
# entry points


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
          runner: Runner | None = None, metrics_address: str = "",
          pod_drift_interval: float = 0.0) -> int:
    """Run the resident engine until SIGTERM/SIGINT; returns the exit status (0 = clean stop).

    ``runner`` replaces ``transport.plugin.serve_request`` (tests only); the default is the real engine, warmed up
    before the socket appears. ``metrics_address`` (HOST:PORT, empty: none) serves Prometheus
    metrics; ``pod_drift_interval`` (seconds, 0: never) compares every attachment's pod side
    with its record (``engine.drift``).
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
    try:
        return _serve(socket_path, threads, runner, metrics, state_dir, pod_drift_interval)
    finally:
        if metrics is not None:
            metrics.stop()


def _serve(socket_path: str, threads: int, runner: Runner, metrics, state_dir: str,
           pod_drift_interval: float) -> int:
    server = Server(socket_path, threads=threads, runner=runner,
                    on_reply=metrics.metrics.request if metrics is not None else None)
    # Handlers first: a SIGTERM during warm-up or bind is a clean stop too (the pipe remembers it).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    warm_up(runner)
    try:
        server.bind()
    except OSError as exc:
        log.error("cannot listen on %s: %s", socket_path, exc)
        return 1
    log.info("resident engine listening on %s (pid %d, %d threads)", socket_path, os.getpid(),
             threads)
    drift = None
    if pod_drift_interval:
        from cniplugin.engine.drift import PodDriftChecker
        drift = PodDriftChecker(state_dir, pod_drift_interval)
        drift.start()
    try:
        server.serve_forever()
    finally:
        if drift is not None:
            drift.stop()
    # Already stopping: a repeated signal must not kill the interpreter while it tears down.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``cni-route-tune serve [--socket PATH] [--threads N] [--metrics-address HOST:PORT]
    [--pod-drift-interval SECONDS]``."""
    args = build_parser().parse_args(argv)
    from cniplugin.transport.pydantic_setup import disable_plugin_discovery
    disable_plugin_discovery()
    _setup_logging()
    return serve(args.socket or _shim.socket_path(os.environ), threads=args.threads,
                 metrics_address=args.metrics_address,
                 pod_drift_interval=args.pod_drift_interval)


def build_parser() -> argparse.ArgumentParser:
    """``serve``'s options (the DaemonSet's arguments are checked against it)."""
    parser = argparse.ArgumentParser(prog="cni-route-tune serve",
                                     description="Run the resident route-tune engine.")
    parser.add_argument("--socket", default=None,
                        help=f"unix socket path (default: $ROUTE_TUNE_SOCKET or "
                             f"{_shim.DEFAULT_SOCKET})")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="requests served concurrently (default %(default)s)")
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


def _setup_logging() -> None:
    """The plugin's handlers; a daemon's stderr is its container log, so INFO goes there too."""
    level = os.environ.get(_logging.STDERR_LEVEL_ENV) or "info"
    _logging.setup({_logging.STDERR_LEVEL_ENV: level})


def _server_log_options() -> _logging.LogOptions | None:
    """Where the server's own lines go: ``<logDir>/route-tune.log`` of the node defaults."""
    try:
        log_dir = read_node_defaults(os.environ).values.get("logDir") or _logging.DEFAULT_LOG_DIR
        return _logging.LogOptions(
            level=logging.INFO, file=os.path.join(log_dir, _logging.DEFAULT_LOG_FILE))
    except CNIError as exc:
        log.warning("server log file disabled: %s", exc.msg)
        return None


if __name__ == "__main__":
    sys.exit(main())
