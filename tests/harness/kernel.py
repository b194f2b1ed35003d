"""Small helpers of the kernel suites: commands in a netns, route lookups, one echo, replies."""

from __future__ import annotations

import json
import os
import secrets
import subprocess

from cniplugin.lab.ping import probe
from conftest import ROUTE_TUNE, in_netns


def sh(*args: str, check: bool = True) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if check and done.returncode:
        raise AssertionError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def nsx(ns: str, *args: str, check: bool = True) -> str:
    return sh("ip", "netns", "exec", ns, *args, check=check)


def ok(done: subprocess.CompletedProcess) -> dict | None:
    """A plugin run that must have succeeded: its JSON result (None when it printed nothing)."""
    assert done.returncode == 0, (done.stdout, done.stderr)
    return json.loads(done.stdout) if done.stdout.strip() else None


def route_get(ns: str, dst: str, src: str = "") -> dict:
    args = ["ip", "-j", "route", "get", dst] + (["from", src] if src else [])
    return json.loads(nsx(ns, *args))[0]


def table_of(ns: str, dst: str, src: str) -> str:
    words = nsx(ns, "ip", "route", "get", dst, "from", src).split()
    return words[words.index("table") + 1] if "table" in words else "main"


def pings(ns: str, dst: str, src: str, timeout: float = 2.0) -> bool:
    """One ICMP echo from ``src`` to ``dst`` inside ``ns`` (the lab's echo client, in-process)."""
    return in_netns(ns, lambda: probe(src, dst, timeout, secrets.randbits(16), 1))["ok"]


class NetnsGroup:
    """Namespace bookkeeping of a small kernel-suite topology named by ``tag`` (a dataclass
    with ``tag`` and ``created`` fields): node ``<tag>n``, pod ``<tag>p``; ``add_ns`` creates one
    (no DAD, so link-locals never turn valid between two snapshots; lo up), ``cleanup`` deletes
    every namespace it created."""

    tag: str
    created: list[str]
    tmp: str
    cid: str  # CNI_CONTAINERID of the topology's pod (a class attribute of the subclass)

    node = property(lambda self: f"{self.tag}n")
    pod = property(lambda self: f"{self.tag}p")

    def add_ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.created.append(name)
        nsx(name, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
        nsx(name, "ip", "link", "set", "lo", "up")

    def cleanup(self) -> None:
        for name in reversed(self.created):
            sh("ip", "netns", "del", name, check=False)

    def run(self, command: str, ifname: str, config: dict, netns: str | None = None,
            extra_env: dict | None = None) -> subprocess.CompletedProcess:
        """The installed route-tune in the node netns, as a runtime calls it (state under ``tmp``)."""
        defaults = os.path.join(self.tmp, f"{self.tag}-defaults.json")
        with open(defaults, "w") as f:
            json.dump({"stateDir": os.path.join(self.tmp, "state"),
                       "logDir": os.path.join(self.tmp, "log")}, f)
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": self.cid, "CNI_IFNAME": ifname,
               "CNI_NETNS": f"/var/run/netns/{self.pod}" if netns is None else netns,
               "CNI_PATH": "/usr/lib/cni", "ROUTE_TUNE_DEFAULTS": defaults,
               "PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(extra_env or {})}
        return subprocess.run(["ip", "netns", "exec", self.node, str(ROUTE_TUNE)],
                              input=json.dumps(config).encode(), env=env, capture_output=True,
                              check=False)
