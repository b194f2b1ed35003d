"""Small helpers of the kernel suites: commands in a netns, route lookups, one echo, replies."""

from __future__ import annotations

import json
import subprocess

from cniplugin.lab.ping import probe
from harness.host import in_netns


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
    return in_netns(ns, lambda: probe(src, dst, timeout))["ok"]

