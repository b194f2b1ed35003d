"""The resident-server starter: ``cni-route-tune serve`` on a private socket, in a lab netns; the
plugin's log (``plugin_log``) and what it says the engine served (``served_count``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

from cniplugin.lab.runtime import PluginEnv
from cniplugin.protocol import dispatch as _dispatch
from cniplugin.transport import shim as _shim
from harness.host import CNI_ROUTE_TUNE, wait_until


def server_cmd(sock: Path) -> list[str]:
    """The resident engine as a node runs it: ``cni-route-tune serve`` on a private socket."""
    return [str(CNI_ROUTE_TUNE), "serve", "--socket", str(sock)]


def answers(sock: Path | str) -> bool:
    """Whether something accepts connections on the unix socket ``sock``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(sock))
        except OSError:
            return False
    return True


class Resident:
    """``cni-route-tune serve`` inside ``netns`` (``ip netns exec`` execs: ``pid`` is the server),
    or in the caller's netns when ``netns`` is None; node defaults and logs are ``penv``'s.

    ``own_netns``: create ``netns`` at start and delete it at stop (a server that sits in an empty
    netns of its own; the shim hands it the caller's netns with every request).

    ``start()`` returns once the engine owns the socket (its ``--ready-file`` exists), so a
    ``successor()`` started while this one serves has taken the socket over when it returns.
    """

    def __init__(self, netns: str | None, penv: PluginEnv, extra_env: dict[str, str] | None = None,
                 own_netns: bool = False, name: str = "server"):
        self.netns, self.penv, self.own_netns, self.name = netns, penv, own_netns, name
        self.sock = penv.workdir / "run" / "engine.sock"
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen | None = None
        self.stderr_path = penv.workdir / f"{name}.stderr"
        self.ready_file = penv.workdir / f"{name}.ready"

    def successor(self, name: str, extra_env: dict[str, str] | None = None) -> Resident:
        """Another engine for the same socket, node defaults and netns (not started)."""
        return Resident(self.netns, self.penv, {**self.extra_env, **(extra_env or {})},
                        name=name)

    @property
    def env(self) -> dict[str, str]:
        """What a plugin's environment needs so route-tune forwards to this server."""
        return {"ROUTE_TUNE_SOCKET": str(self.sock), "ROUTE_TUNE_ENGINE": "resident"}

    def start(self) -> Resident:
        self.launch()
        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, \
                f"server died at start:\n{self.log()}"
            return self.ready_file.exists()
        wait_until(ready, what=f"the server to serve on {self.sock}")
        return self

    def launch(self) -> subprocess.Popen:
        """Start the process and return at once (``start()`` also waits until it serves)."""
        self.ready_file.unlink(missing_ok=True)  # a SIGKILLed namesake's: it never removed it
        if self.own_netns:
            subprocess.run(["ip", "netns", "add", self.netns], check=True)
        #: The server's process environment (a second server can be started with it).
        self.server_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                           "ROUTE_TUNE_DEFAULTS": str(self.penv.defaults_file), **self.extra_env}
        inside = ["ip", "netns", "exec", self.netns] if self.netns else []
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [*inside, *server_cmd(self.sock), "--ready-file", str(self.ready_file)],
                env=self.server_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err)
        return self.proc

    def serving(self) -> bool:
        """Running and owning the socket (its ready file exists)."""
        return self.proc is not None and self.proc.poll() is None and self.ready_file.exists()

    def answers(self) -> bool:
        return answers(self.sock)

    def request_env(self, **env: str) -> dict[str, str]:
        """A request's environment for the shim's client: this server's socket and defaults."""
        return {"ROUTE_TUNE_SOCKET": str(self.sock), "ROUTE_TUNE_DEFAULTS": str(self.penv.defaults_file),
                **env}

    def alive(self) -> bool:
        """Still running and still answering VERSION correctly."""
        reply = _shim.forward(self.request_env(CNI_COMMAND="VERSION"), b"")
        return self.proc is not None and self.proc.poll() is None and \
            reply == (0, _dispatch.version_reply(), b"")

    def fds_to(self, target: str) -> int:
        """How many of the server's fds point at ``target``."""
        count = 0
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                count += os.readlink(f"/proc/{self.pid}/fd/{name}") == target
            except FileNotFoundError:
                pass  # closed meanwhile
        return count

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def kill(self) -> None:
        """SIGKILL (a crash): no cleanup runs, the socket file stays behind."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int | None:
        try:
            if self.proc is None:
                return None
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait()
        finally:
            if self.own_netns:
                subprocess.run(["ip", "netns", "del", self.netns], check=False,
                               stderr=subprocess.DEVNULL)

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def __enter__(self) -> Resident:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        status = self.stop()
        assert status in (0, -signal.SIGKILL, None), f"server exited {status}:\n{self.log()[-3000:]}"


def plugin_log(penv: PluginEnv) -> str:
    """The plugin's whole log in ``penv``'s log dir (``route-tune.log`` and its rotated files)."""
    return "".join(path.read_text(errors="replace")
                   for path in sorted(penv.log_dir.glob("route-tune.log*")))


def served_count(penv: PluginEnv) -> int:
    """Requests the resident engine answered (its "served via resident engine" log lines)."""
    return plugin_log(penv).count("served via resident engine")
