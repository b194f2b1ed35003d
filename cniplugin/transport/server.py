"""The resident engine: ``cni-route-tune serve``.

A unix-socket server that keeps the engine (pyroute2, pydantic models) loaded and answers the
forwarding shim (``transport.shim``) of the ``route-tune`` executable. Wire format and security model:
``docs/resident.md``. In short: root-only socket, root-only peers (SO_PEERCRED), one thread per
connection, requests for the same pod netns serialised, every received fd closed, and no request -
however malformed - ends the server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from cniplugin.protocol import log as _logging
from cniplugin.transport import handover as _handover
from cniplugin.transport import shim as _shim
from cniplugin.protocol.env import read_node_defaults
from cniplugin.protocol.errors import CNIError, InternalError, IOFailure, UnsafeRequest
from cniplugin.transport.frames import BadRequest, Mismatch, close_all, error_frame, frame, \
    peer_cred, read_request

log = logging.getLogger("cniplugin.server")

#: A peer has this long to deliver its request and to take the reply (run() itself is untimed).
IO_TIMEOUT = 30.0
DEFAULT_THREADS = 32

#: Test hooks, read from the SERVER's own environment at start (never from a request), set only by
#: tests/kernel/test_server.py: append "enter|exit <netns key> <monotonic ns> <pid> <command>
#: <container id>/<ifname>" lines to this file around every run, and sleep this many seconds
#: inside the per-netns critical section.
TRACE_ENV = "ROUTE_TUNE_SERVER_TEST_TRACE"
DELAY_ENV = "ROUTE_TUNE_SERVER_TEST_DELAY"

Runner = Callable[..., object]  # _protocol.run's signature: returns an Outcome
#: Called after every request: (CNI_COMMAND, CNI result code, seconds) - the metrics' count. The
#: code is the runner's ``Outcome.code`` (0 = success; 999 when the runner itself failed).
ReplyHook = Callable[[str, "int | None", float], None]


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
        self._gate = _handover.Gate()
        self._listener: socket.socket | None = None
        self._log_options = _server_log_options()
        self._trace = os.environ.get(TRACE_ENV) or None
        self._delay = float(os.environ.get(DELAY_ENV) or 0)

    # -- lifecycle --------------------------------------------------------------------------

    def bind(self) -> None:
        """Get the listening socket: a new one, or the running engine's (``transport.handover``)."""
        self._listener, how = _handover.take_listener(self.socket_path)
        log.info("listening on %s: %s", self.socket_path, how)

    @property
    def handed_over(self) -> bool:
        """The loop ended because a successor took the socket (which must then stay in place)."""
        return self._gate.state == "handed-over"

    def stop(self) -> None:
        """Ask the accept loop to stop (async-signal-safe: one write to a pipe)."""
        if self._gate.state == "closed":
            return  # the pipe is closed (or closing); its fd number may be reused
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")

    def serve_forever(self) -> None:
        """Accept until stop(); then remove the socket and wait for in-flight requests."""
        assert self._listener is not None, "bind() first"
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        poller.register(self._gate.fileno(), select.POLLIN)
        try:
            while True:
                self._slots.acquire()  # backpressure: the kernel backlog queues the rest
                ready = {fd for fd, _ in poller.poll()}
                if self._stop_r in ready:
                    self._slots.release()
                    break
                if self._gate.fileno() in ready:
                    self._slots.release()
                    if self._gate.pause():  # until a handover succeeded (True) or failed
                        break
                    continue
                try:
                    conn, _ = self._listener.accept()
                except OSError as exc:  # e.g. EMFILE: keep serving the others
                    self._slots.release()
                    log.warning("accept failed: %s", exc)
                    time.sleep(0.05)
                    continue
                self._start_worker(conn)
        finally:
            self._shutdown()

    def _start_worker(self, conn: socket.socket) -> None:
        """Serve ``conn`` on its own thread; the caller holds a slot for it."""
        worker = threading.Thread(target=self._worker, args=(conn,), daemon=True,
                                  name="route-tune-request")
        with self._workers_mu:
            self._workers.add(worker)
        worker.start()

    def _shutdown(self) -> None:
        if not self._gate.close():  # not handed over: the socket and its path are ours to end
            # Unlink first: new clients then fall back in-process instead of queueing on a
            # dying server; whoever already queued is still served.
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
            self._drain_backlog()
        # After a handover the socket (and its path) is the successor's: only our fd goes.
        if self._listener is not None:
            self._listener.close()
        with self._workers_mu:
            pending = list(self._workers)
        if pending:
            log.info("waiting for %d in-flight request(s)", len(pending))
        for worker in pending:
            worker.join()
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        self._gate.release()
        log.info("resident engine stopped")

    def _drain_backlog(self) -> None:
        """Accept and serve every connection already queued on the (now unlinked) socket."""
        if self._listener is None:
            return
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        while poller.poll(0):
            self._slots.acquire()
            try:
                conn, _ = self._listener.accept()
            except OSError:
                self._slots.release()
                return
            self._start_worker(conn)

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
            if not conn.recv(1, socket.MSG_PEEK):
                return  # connected and closed without a byte: someone checking that we answer
            env, stdin, pod_fd, node_fd = read_request(conn, fds)
        except Mismatch as exc:
            close_all(fds)
            if bytes(exc.args[0]) == _handover.REQUEST:
                assert self._listener is not None
                self._gate.hand_over(conn, self._listener, pid)
                return
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
            self._trace_line("enter", key, env)
            if self._delay:
                time.sleep(self._delay)
            try:
                out = self._call(env, stdin, pod_fd, node_fd)
            finally:
                self._trace_line("exit", key, env)
        return out

    def _call(self, env: Mapping[str, str], stdin: bytes, pod_fd: int | None,
              node_fd: int | None) -> bytes:
        started = time.monotonic()
        try:
            out = self._runner(env, stdin, pod_netns_fd=pod_fd, node_netns_fd=node_fd)
            stdout, stderr, code = bytes(out.stdout), bytes(out.stderr), int(out.exit_code)
            if not 0 <= code <= 255:
                raise ValueError(f"exit code {code} out of range")
            cni_code = out.code  # dispatch ran here: it knows the code, stdout is not parsed
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - any failure is a 999 reply
            log.error("internal error serving %s: %r", env.get("CNI_COMMAND", "?"), exc,
                      exc_info=True)
            error = InternalError("internal error", repr(exc))
            reply = error_frame(error, stdin)
            self._replied(env, error.code, started)
            return reply
        with _logging.request_context(_logging.request_fields(env), self._log_options):
            log.info("served via resident engine (exit %d)", code)
        self._replied(env, cni_code, started)
        return frame(code, stdout, stderr)

    def _replied(self, env: Mapping[str, str], cni_code: int | None, started: float) -> None:
        if self.on_reply is not None:
            try:
                self.on_reply(env.get("CNI_COMMAND", ""), cni_code,
                              time.monotonic() - started)
            except Exception:  # counting must never cost a reply
                log.exception("request metrics failed")

    def _trace_line(self, what: str, key: object, env: Mapping[str, str]) -> None:
        if not self._trace:
            return
        request = (f"{env.get('CNI_COMMAND') or '-'} "
                   f"{env.get('CNI_CONTAINERID') or '-'}/{env.get('CNI_IFNAME') or '-'}")
        line = (f"{what} {key[1] if key else '-'} {time.monotonic_ns()} {os.getpid()} "
                f"{request}\n").encode()
        fd = os.open(self._trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line)  # one short O_APPEND write: atomic between threads
        finally:
            os.close(fd)


def _server_log_options() -> _logging.LogOptions | None:
    """Where the server's own lines go: ``<logDir>/route-tune.log`` of the node defaults."""
    try:
        log_dir = read_node_defaults(os.environ).values.get("logDir") or _logging.DEFAULT_LOG_DIR
        return _logging.LogOptions(
            level=logging.INFO, file=os.path.join(log_dir, _logging.DEFAULT_LOG_FILE))
    except CNIError as exc:
        log.warning("server log file disabled: %s", exc.msg)
        return None

