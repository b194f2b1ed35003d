"""Which interface every flow really left and arrived on: per-flow nftables counters in the pods.

`FlowCounters(namespaces)` adds, for its lifetime, a table `inet route_tune_lab_flows` to each
namespace with two dynamic sets keyed by (interface, protocol, source port, destination port),
one filled at prerouting (the interface a packet arrived on) and one at postrouting (the one it
left by), each element with a kernel counter.  Only the flows' own TCP/UDP packets are counted,
so ARP, neighbour discovery and announcements never blur the picture.  The table is gone before
any whole-state snapshot is taken.

`run_flows` runs bounded TCP streams (lab/stream.py) between namespaces, all at the same time,
and returns per flow what left and arrived where on both ends (`FlowPath`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .topology import run

STREAM_SCRIPT = Path(__file__).with_name("stream.py")
TABLE = "route_tune_lab_flows"
_RULESET = """table inet {table} {{
  set arrived {{ type ifname . inet_proto . inet_service . inet_service; flags dynamic; counter; }}
  set left {{ type ifname . inet_proto . inet_service . inet_service; flags dynamic; counter; }}
  chain pre {{
    type filter hook prerouting priority -400;
    meta l4proto {{ tcp, udp }} update @arrived {{ iifname . meta l4proto . th sport . th dport }}
  }}
  chain post {{
    type filter hook postrouting priority 400;
    meta l4proto {{ tcp, udp }} update @left {{ oifname . meta l4proto . th sport . th dport }}
  }}
}}
"""


@dataclass(frozen=True)
class Flow:
    """One stream: from `src_ns` (bound to `src`, "" = unbound) to `dst`:`port` in `dst_ns`."""

    src_ns: str
    dst_ns: str
    src: str
    dst: str
    port: int


@dataclass
class FlowPath:
    """Packets of one flow per interface, on both ends: the request leaving the client
    (`client_out`) and arriving at the server (`server_in`), the reply leaving the server
    (`server_out`) and arriving back (`client_in`)."""

    flow: Flow
    ok: bool
    error: str = ""
    local: str = ""  # the client's source address (the kernel's choice when unbound)
    client_out: dict[str, int] = field(default_factory=dict)
    server_in: dict[str, int] = field(default_factory=dict)
    server_out: dict[str, int] = field(default_factory=dict)
    client_in: dict[str, int] = field(default_factory=dict)
    #: namespaces the flow was routed through: {ns: {"request"|"reply": (arrived on, left by)}}
    transit: dict[str, dict[str, tuple[set[str], set[str]]]] = field(default_factory=dict)

    def ifaces(self) -> tuple[set[str], set[str], set[str], set[str]]:
        """(client out, server in, server out, client in): the interfaces that carried any packet."""
        return (set(self.client_out), set(self.server_in), set(self.server_out), set(self.client_in))

    def only(self, client: str, server: str) -> bool:
        """The whole flow (both directions) used `client`'s and `server`'s interface and no other."""
        return self.ifaces() == ({client}, {server}, {server}, {client})


class FlowCounters:
    """Context manager: the counting table in each of `namespaces` (removed on exit)."""

    def __init__(self, namespaces: list[str]) -> None:
        self.namespaces = list(dict.fromkeys(namespaces))

    def __enter__(self) -> FlowCounters:
        for ns in self.namespaces:
            run("ip", "netns", "exec", ns, "nft", "-f", "-", stdin=_RULESET.format(table=TABLE))
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in self.namespaces:
            run("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", TABLE, check=False)

    def read(self, ns: str) -> dict[str, dict[tuple[str, str, int, int], int]]:
        """{"arrived"|"left": {(ifname, proto, sport, dport): packets}} in `ns`."""
        doc = json.loads(run("ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet", TABLE).stdout)
        sets = {item["set"]["name"]: item["set"] for item in doc["nftables"] if "set" in item}
        return {name: {tuple(e["elem"]["val"]["concat"]): e["elem"]["counter"]["packets"]
                       for e in sets[name].get("elem", [])} for name in ("arrived", "left")}


def by_iface(counts: dict[tuple[str, str, int, int], int], *, sport: int | None = None,
             dport: int | None = None) -> dict[str, int]:
    """Packets per interface of the entries with that source or destination port."""
    out: dict[str, int] = defaultdict(int)
    for (ifname, _, sp, dp), packets in counts.items():
        if (sport is None or sp == sport) and (dport is None or dp == dport):
            out[ifname] += packets
    return dict(out)


def _python_in(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-I", "-S", str(STREAM_SCRIPT), *args]


@contextmanager
def _servers(flows: list[Flow], command: str, spec, timeout: float) -> Iterator[None]:
    """One `stream.py <command>` per destination namespace (its specs: `spec(flow)`), each
    listening before the block runs; after it, each is waited for (it exits once its flows are
    done, or at `timeout`) and killed if it outlives that."""
    servers = []
    try:
        for dst_ns in dict.fromkeys(f.dst_ns for f in flows):
            specs = [spec(f) for f in flows if f.dst_ns == dst_ns]
            proc = subprocess.Popen(_python_in(dst_ns, command, "--timeout", str(timeout), *specs),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            servers.append(proc)
            if proc.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
                raise RuntimeError(f"stream.py {command} in {dst_ns} failed: {proc.stderr.read()}")  # type: ignore[union-attr]
        yield
    finally:
        for proc in servers:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_flows(flows: list[Flow], size: int = 2 << 20, timeout: float = 60.0,
              transit: tuple[str, ...] = ()) -> list[FlowPath]:
    """Every flow at once (one server per destination namespace, one client process per source
    namespace), each sending `size` bytes and reading them echoed back; counted per interface,
    also in the `transit` namespaces (routers: a bridge's switching is not seen there)."""
    with FlowCounters([f.src_ns for f in flows] + [f.dst_ns for f in flows] + list(transit)) as counters:
        with _servers(flows, "serve", lambda f: f"{f.dst},{f.port}", timeout):
            by_src = list(dict.fromkeys(f.src_ns for f in flows))

            def client(src_ns: str) -> list[dict]:
                specs = [f"{f.src},{f.dst},{f.port},{size}" for f in flows if f.src_ns == src_ns]
                return json.loads(run(*_python_in(src_ns, "send", "--timeout", str(timeout), *specs)).stdout)
            with ThreadPoolExecutor(len(by_src)) as pool:
                results = dict(zip(by_src, pool.map(client, by_src)))
        counts = {ns: counters.read(ns) for ns in counters.namespaces}
    return _paths(flows, results, counts, transit)


def send_datagrams(flows: list[Flow], count: int = 5, reflect: bool = False,
                   timeout: float = 5.0) -> list[FlowPath]:
    """`count` UDP datagrams per flow: where the requests left (and, if they got there,
    arrived). For paths whose replies the lab does not route back: with `reflect` the server
    answers every datagram, so where the answers left the server is counted too (`server_out`),
    although they never reach the client."""
    with FlowCounters([f.src_ns for f in flows] + [f.dst_ns for f in flows]) as counters:
        with _servers(flows if reflect else [], "reflect", lambda f: f"{f.dst},{f.port},{count}", timeout):
            results = {}
            for src_ns in dict.fromkeys(f.src_ns for f in flows):
                specs = [f"{f.src},{f.dst},{f.port},{count}" for f in flows if f.src_ns == src_ns]
                results[src_ns] = json.loads(run(*_python_in(src_ns, "datagrams", *specs)).stdout)
        counts = {ns: counters.read(ns) for ns in counters.namespaces}
    return _paths(flows, results, counts)


def _paths(flows: list[Flow], results: dict[str, list[dict]], counts: dict,
           transit: tuple[str, ...] = ()) -> list[FlowPath]:
    seen: dict[str, int] = defaultdict(int)
    paths = []
    for f in flows:
        res = results[f.src_ns][seen[f.src_ns]]
        seen[f.src_ns] += 1
        client, server = counts[f.src_ns], counts[f.dst_ns]
        paths.append(FlowPath(
            f, bool(res["ok"]), res["error"], res["local"],
            client_out=by_iface(client["left"], dport=f.port), server_in=by_iface(server["arrived"], dport=f.port),
            server_out=by_iface(server["left"], sport=f.port), client_in=by_iface(client["arrived"], sport=f.port),
            transit={ns: {"request": (set(by_iface(counts[ns]["arrived"], dport=f.port)),
                                      set(by_iface(counts[ns]["left"], dport=f.port))),
                          "reply": (set(by_iface(counts[ns]["arrived"], sport=f.port)),
                                    set(by_iface(counts[ns]["left"], sport=f.port)))} for ns in transit}))
    return paths
