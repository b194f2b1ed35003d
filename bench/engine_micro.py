"""Micro-benchmark of the engine's own per-request work (imports done, in-process).

Builds a small lab in namespaces tagged ``rtU`` (a node, a pod with a Calico-style eth0 and three
macvlan rails), attaches net2 and net3 once, then times warm ``cmd_add`` + ``cmd_del`` cycles of
net1: the median of ``--cycles`` (50) runs, with the number of netlink requests sent and messages
decoded per command. The whole run is repeated with 5,000 foreign routes in the node's
hostRuleTable (500), which must cost (almost) nothing. ``--underlay`` measures the underlay
first invocation (eth0 = macvlan: veth pair, nft table, ...) instead.

Run (root):  .venv/bin/python bench/engine_micro.py [--cycles 50] [--underlay]
Nothing outside the namespaces it creates is touched; they are removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cniplugin.engine import commands as _engine  # noqa: E402  (imports done before timing)
from cniplugin.protocol.invocation import Invocation, from_request  # noqa: E402
from cniplugin.kernel import netns as _netns  # noqa: E402

CID = "b3nchb3nchb3nchb3nch"


def sh(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def nsx(ns: str, *args: str) -> str:
    return sh("ip", "netns", "exec", ns, *args)


class Lab:
    """node + pod; overlay: Calico-style eth0 and macvlan rails; underlay: eth0 is a macvlan."""

    def __init__(self, underlay: bool) -> None:
        self.tag = f"rtU{secrets.token_hex(2)}"
        self.node, self.pod = f"{self.tag}n", f"{self.tag}p"
        self.underlay = underlay
        self.created: list[str] = []

    def build(self) -> None:
        for ns in (self.node, self.pod):
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
            nsx(ns, "ip", "link", "set", "lo", "up")
        n, p = self.node, self.pod
        nsx(n, "ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1")
        for link in ("up0", "up1"):
            nsx(n, "ip", "link", "set", link, "up")
        nsx(n, "ip", "addr", "add", "10.1.20.4/24", "dev", "up0")
        if self.underlay:
            nsx(n, "ip", "link", "add", "eth0", "link", "up0", "type", "macvlan", "mode", "bridge")
            nsx(n, "ip", "link", "set", "eth0", "netns", p)
            nsx(p, "ip", "addr", "add", "10.1.20.50/24", "dev", "eth0")
            nsx(p, "ip", "link", "set", "eth0", "up")
            nsx(p, "ip", "route", "add", "default", "via", "10.1.20.1", "dev", "eth0")
        else:
            nsx(n, "ip", "link", "add", "cali0", "address", "ee:ee:ee:ee:ee:ee", "type", "veth",
                "peer", "name", "eth0", "netns", p)
            nsx(n, "ip", "link", "set", "cali0", "up")
            nsx(p, "ip", "link", "set", "eth0", "up")
            nsx(p, "ip", "addr", "add", "10.233.119.164/32", "dev", "eth0")
            nsx(p, "ip", "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
            nsx(p, "ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
            nsx(n, "ip", "route", "add", "10.233.119.164/32", "dev", "cali0")
        for k in (1, 2, 3):
            nsx(n, "ip", "link", "add", f"r{k}", "type", "veth", "peer", "name", f"r{k}p")
            nsx(n, "ip", "link", "set", f"r{k}", "up")
            nsx(n, "ip", "link", "add", f"net{k}", "link", f"r{k}", "type", "macvlan", "mode",
                "bridge")
            nsx(n, "ip", "link", "set", f"net{k}", "netns", p)
            nsx(p, "ip", "addr", "add", f"172.16.1{k}.10/24", "dev", f"net{k}")
            nsx(p, "ip", "link", "set", f"net{k}", "up")

    def foreign_routes(self, count: int) -> None:
        batch = "".join(f"route add 10.{50 + i // 65536 % 100}.{i // 256 % 256}.{i % 256}/32 "
                        f"dev up0 table 500\n" for i in range(count))
        subprocess.run(["ip", "netns", "exec", self.node, "ip", "-batch", "-"], input=batch,
                       text=True, check=True)

    def cleanup(self) -> None:
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def prev_result(ifname: str, address: str, gateway: str) -> dict:
    return {"cniVersion": "1.0.0", "interfaces": [{"name": ifname, "sandbox": "x"}],
            "ips": [{"address": address, "gateway": gateway, "interface": 0}]}


class Counter:
    """Counts netlink requests sent and messages decoded (``kernel.rtnl.Socket`` patched in place)."""

    def __init__(self) -> None:
        from cniplugin.kernel import rtnl as _rtnl
        self.sent = self.decoded = 0
        exchange = _rtnl.Socket._exchange
        counter = self

        def counted(self, *args, **kwargs):
            counter.sent += 1
            out = exchange(self, *args, **kwargs)
            counter.decoded += len(out)
            return out

        _rtnl.Socket._exchange = counted

    def take(self) -> tuple[int, int]:
        out = (self.sent, self.decoded)
        self.sent = self.decoded = 0
        return out


def request(lab: Lab, scratch: str, command: str, ifname: str, prev: dict | None,
            node_fd: int, pod_fd: int, **keys) -> Invocation:
    raw = {"cniVersion": "1.0.0", "name": "bench", "type": "route-tune",
           "overlayPodCIDR": ["10.233.64.0/18"], "serviceCIDR": ["10.233.0.0/18"],
           "hijackCIDR": ["169.254.0.0/16"], **keys}
    if prev is not None:
        raw["prevResult"] = prev
    environ = {"CNI_COMMAND": command, "CNI_CONTAINERID": CID, "CNI_IFNAME": ifname,
               "CNI_NETNS": f"/var/run/netns/{lab.pod}", "CNI_PATH": "/usr/lib/cni",
               "ROUTE_TUNE_DEFAULTS": os.path.join(scratch, "defaults.json")}
    # Parsed before timing: the engine's work is what we measure.
    return from_request(environ, raw, pod_netns_fd=pod_fd, node_netns_fd=node_fd)


def measure(lab: Lab, scratch: str, cycles: int, counter: Counter, node_fd: int,
            pod_fd: int) -> dict:
    if lab.underlay:
        ifname, prev = "eth0", prev_result("eth0", "10.1.20.50/24", "10.1.20.1")
        extra = {"mode": "underlay"}
    else:
        ifname, prev = "net1", prev_result("net1", "172.16.11.10/24", "172.16.11.254")
        extra = {}
    add_ms, del_ms, add_cpu, del_cpu, add_msgs, del_msgs = [], [], [], [], None, None
    rss_early = 0
    for cycle in range(cycles):
        if cycle == min(10, cycles - 1):
            rss_early = rss_kib()
        add_req = request(lab, scratch, "ADD", ifname, prev, node_fd, pod_fd, **extra)
        del_req = request(lab, scratch, "DEL", ifname, None, node_fd, pod_fd, **extra)
        counter.take()
        start, cpu = time.perf_counter(), time.thread_time()
        _engine.cmd_add(add_req)
        add_ms.append((time.perf_counter() - start) * 1000)
        add_cpu.append((time.thread_time() - cpu) * 1000)
        add_msgs = counter.take()
        start, cpu = time.perf_counter(), time.thread_time()
        _engine.cmd_del(del_req)
        del_ms.append((time.perf_counter() - start) * 1000)
        del_cpu.append((time.thread_time() - cpu) * 1000)
        del_msgs = counter.take()
    return {"add_ms": statistics.median(add_ms), "del_ms": statistics.median(del_ms),
            "add_min": min(add_ms), "del_min": min(del_ms),
            "add_cpu": statistics.median(add_cpu), "del_cpu": statistics.median(del_cpu),
            "add_msgs": add_msgs, "del_msgs": del_msgs, "rss_growth": rss_kib() - rss_early}


def rss_kib() -> int:
    """Resident set size of this process (KiB): must stay flat over the cycles."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--foreign", type=int, default=5000)
    parser.add_argument("--underlay", action="store_true")
    parser.add_argument("--profile", action="store_true", help="cProfile ADD, print the top 25")
    options = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    counter = Counter()
    lab = Lab(options.underlay)
    if options.profile:
        import cProfile
        import pstats
        profiler = cProfile.Profile()
        _engine_add = _engine.cmd_add

        def profiled(req):
            return profiler.runcall(_engine_add, req)
        _engine.cmd_add = profiled
    # State on tmpfs, as /run/route-tune is on a node (fsync on ext4 would dominate).
    with tempfile.TemporaryDirectory(prefix="rtU-bench-", dir="/dev/shm") as scratch, \
            contextlib.ExitStack() as stack:
        stack.callback(lab.cleanup)
        with open(os.path.join(scratch, "defaults.json"), "w") as f:
            json.dump({"stateDir": os.path.join(scratch, "state"),
                       "logDir": os.path.join(scratch, "log")}, f)
        lab.build()
        node_fd = _netns.open_netns(f"/var/run/netns/{lab.node}")
        pod_fd = _netns.open_netns(f"/var/run/netns/{lab.pod}")
        stack.callback(os.close, node_fd)
        stack.callback(os.close, pod_fd)
        if not lab.underlay:  # net2, net3 attached once: net1 is the third rail of the pod
            for k in (2, 3):
                _engine.cmd_add(request(lab, scratch, "ADD", f"net{k}", prev_result(
                    f"net{k}", f"172.16.1{k}.10/24", f"172.16.1{k}.254"), node_fd, pod_fd))
        rows = [("empty node", measure(lab, scratch, options.cycles, counter, node_fd, pod_fd))]
        lab.foreign_routes(options.foreign)
        rows.append((f"{options.foreign} foreign routes in table 500",
                     measure(lab, scratch, options.cycles, counter, node_fd, pod_fd)))
    if options.profile:
        pstats.Stats(profiler).sort_stats(os.environ.get("RTU_SORT", "cumulative")).print_stats(25)
    what = "underlay eth0 (first invocation)" if lab.underlay else "overlay net1 (3rd rail)"
    print(f"## engine micro-benchmark: {what}, median of {options.cycles}\n")
    print("wall: median (min); cpu: median thread CPU time (user+sys, robust to a busy "
          "machine); requests sent / messages decoded; RSS growth from cycle 10 to the end\n")
    print("| node | ADD wall ms | ADD cpu ms | ADD req/msgs | DEL wall ms | DEL cpu ms | "
          "DEL req/msgs | RSS growth KiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['add_ms']:.1f} ({r['add_min']:.1f}) | {r['add_cpu']:.1f} | "
              f"{r['add_msgs'][0]}/{r['add_msgs'][1]} | {r['del_ms']:.1f} ({r['del_min']:.1f}) | "
              f"{r['del_cpu']:.1f} | {r['del_msgs'][0]}/{r['del_msgs'][1]} | "
              f"{r['rss_growth']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
