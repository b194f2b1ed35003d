"""The built-in multi-NIC lab: a node, a Calico-style pod and K rail gateways in netns.

Everything lives in network namespaces named `<prefix>-...`; the root namespace is never
touched (namespaces are created and deleted, nothing else).  The lab drives `ip` through
subprocesses only (no pyroute2), so it stays independent of the code under test.

Numbering (K = rail number 1..8; see docs/lab.md for the diagram):

    pod eth0            10.233.119.164/32           fd00:10:233::a4/128
    pod eth0 gateway    169.254.1.1 (proxy ARP)     fe80::ecee:eeff:feee:eeee (cali's LL)
    node uplink         10.1.20.4/24                fd00:10:1:20::4/64     (infra: .1 / ::1)
    rail K gateway      172.16.1K.254/24            fd00:16:1K::254/64     (in ns gwK)
    pod netK (IPAM)     172.16.1K.10/24             fd00:16:1K::10/64
    behind gateway K    198.18.K.1/32               fd00:198:18:K::1/128   (gwK's lo only)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

PING_SCRIPT = Path(__file__).with_name("ping.py")
CALI_MAC = "ee:ee:ee:ee:ee:ee"
CALI_LL6 = "fe80::ecee:eeff:feee:eeee"  # EUI-64 link-local of CALI_MAC
POD_IP4, POD_IP6 = "10.233.119.164", "fd00:10:233::a4"
NODE_IP4, NODE_IP6 = "10.1.20.4", "fd00:10:1:20::4"
INFRA_IP4, INFRA_IP6 = "10.1.20.1", "fd00:10:1:20::1"
HIJACK_GW4 = "169.254.1.1"
FAMILIES = {"4": ("4",), "6": ("6",), "dual": ("4", "6")}


class LabError(RuntimeError):
    """An `ip`/helper command failed while building or inspecting the lab."""


def run(*cmd: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command, capturing text output; raise LabError naming the command on failure."""
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def ip_batch(lines: list[str], ns: str | None = None, *opts: str) -> str:
    """Run many `ip` commands in ONE process (`ip [-n NS] -batch -`)."""
    if not lines:
        return ""
    cmd = ["ip", *opts] + (["-n", ns] if ns else []) + ["-batch", "-"]
    return run(*cmd, stdin="\n".join(lines) + "\n").stdout


def rail_addr(k: int, family: str, host: int | str) -> str:
    """Address `host` (e.g. 10, 254) in rail k's subnet, without prefix length."""
    return f"172.16.1{k}.{host}" if family == "4" else f"fd00:16:1{k}::{host}"


def behind_addr(k: int, family: str) -> str:
    """The address only gateway k routes (on its lo)."""
    return f"198.18.{k}.1" if family == "4" else f"fd00:198:18:{k}::1"


def one_address_ranges(per_family: Iterable[tuple[str, str, str]]) -> list[list[dict]]:
    """host-local `ranges` holding one address each, from (subnet, address, gateway) per family.

    One address, because host-local hands out addresses round-robin: a wider range would give a
    re-ADDed interface a different address, and one pod per node needs only one."""
    return [[{"subnet": subnet, "rangeStart": address, "rangeEnd": address, "gateway": gateway}]
            for subnet, address, gateway in per_family]


def rail_ranges(k: int, family: str) -> list[list[dict]]:
    """host-local `ranges` for the seed pod's netK: its one address (.10 / ::10), gateway .254 / ::254."""
    return one_address_ranges((f"172.16.1{k}.0/24" if fam == "4" else f"fd00:16:1{k}::/64",
                               rail_addr(k, fam, 10), rail_addr(k, fam, 254)) for fam in FAMILIES[family])


def netns_names(prefix: str) -> list[str]:
    """Lab namespaces currently present that carry `prefix`."""
    out = run("ip", "-j", "netns", "list").stdout.strip()
    names = [entry["name"] for entry in json.loads(out or "[]")]
    return [n for n in names if n.startswith(prefix)]


def cleanup(prefix: str) -> None:
    """Remove leftovers (namespaces and temp dirs) of earlier, possibly crashed, labs."""
    ip_batch([f"netns del {n}" for n in netns_names(prefix)])
    for leftover in Path(tempfile.gettempdir()).glob(f"{prefix}*-lab-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def decode_many(text: str) -> list:
    """Split concatenated JSON documents (one per batch command)."""
    decoder, docs, pos = json.JSONDecoder(), [], 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return docs
        doc, pos = decoder.raw_decode(text, pos)
        docs.append(doc)


# Fields that change without anyone changing the configuration.
_VOLATILE_ROUTE = {"expires", "cache", "metrics", "flags"}
_LINK_KEYS = ("ifname", "link_type", "address", "mtu", "txqlen", "master", "link", "link_netnsid")


def _norm_route(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in _VOLATILE_ROUTE}


def _sort(items: list[dict]) -> list[dict]:
    return sorted(items, key=lambda d: json.dumps(d, sort_keys=True))


class NetnsTools:
    """What every lab shares: the life cycle of namespaces named `<prefix>-...` (a context
    manager: leftovers removed, `_build()`, everything deleted on exit, `tmp` a private temp dir)
    and the commands run in them: exec, ip, route get, pings, whole-state snapshots.
    `OverlayLab` and `fabric.FabricLab` both build on it."""

    prefix: str
    family: str
    tmp: Path

    @property
    def families(self) -> tuple[str, ...]:
        return FAMILIES[self.family]

    def __enter__(self):  # -> the lab itself (its own class)
        cleanup(self.prefix + "-")
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-lab-"))
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete every namespace of the lab (their links go with them) and the temp dir."""
        ip_batch([f"netns del {n}" for n in netns_names(self.prefix + "-")])
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _build(self) -> None:
        raise NotImplementedError("a lab builds its namespaces in _build")

    def _sysctls(self, ns: str, settings: dict[str, str | int]) -> None:
        if settings:
            run("ip", "netns", "exec", ns, "sysctl", "-qw", *[f"{k}={v}" for k, v in settings.items()])

    def exec(self, ns: str, *cmd: str, check: bool = True, env: dict[str, str] | None = None,
             stdin: str | None = None) -> subprocess.CompletedProcess:
        """Run `cmd` inside namespace `ns` (text mode, output captured)."""
        proc = subprocess.run(["ip", "netns", "exec", ns, *cmd], input=stdin, capture_output=True,
                              text=True, env=env)
        if check and proc.returncode != 0:
            raise LabError(f"[{ns}] {' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def ip(self, ns: str, *args: str) -> str:
        """`ip -n NS ARGS...` → stdout."""
        return run("ip", "-n", ns, *args).stdout

    def route_get(self, ns: str, dst: str, src: str | None = None) -> dict:
        """`ip -j route get DST [from SRC]` in `ns`: the kernel's answer as a dict (dev, gateway, prefsrc...)."""
        args = ["-j", "route", "get", dst] + (["from", src] if src else [])
        return json.loads(self.ip(ns, *args))[0]

    def ping_many(self, ns: str, pairs: list[tuple[str, str]], timeout: float = 2.0) -> list[dict]:
        """One ICMP echo per (src, dst) pair, all from one helper process in `ns`."""
        if not pairs:
            return []
        proc = self.exec(ns, sys.executable, "-I", "-S", str(PING_SCRIPT), "--timeout", str(timeout),
                         *[f"{s}>{d}" for s, d in pairs])
        return json.loads(proc.stdout)

    def ping(self, ns: str, src: str | None, dst: str, timeout: float = 2.0) -> dict:
        """One echo from `src` (None/"" = kernel's choice) to `dst`: {"ok", "rtt_ms", "error"}."""
        return self.ping_many(ns, [(src or "", dst)], timeout)[0]

    def state(self, ns: str) -> dict:
        """A whole-state snapshot of `ns` for before/after comparisons (`namespace_state`)."""
        return namespace_state(ns)


@dataclass
class OverlayLab(NetnsTools):
    """Context manager building the seed topology (docs/lab.md) under `prefix`.

    `prefix` must be unique among concurrently running labs and at most 11 characters
    (the node side of eth0 is `cali<prefix>`, an interface name).
    """

    prefix: str
    rails: int = 8
    family: str = "4"
    tmp: Path = field(init=False)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be 4, 6 or dual, not {self.family!r}")
        if not 1 <= self.rails <= 9:
            raise ValueError("rails must be 1..9 (rail K uses 172.16.1K.0/24)")
        if len(self.prefix) > 11:
            raise ValueError("prefix must be at most 11 characters (cali<prefix> is an ifname)")

    # -- names ---------------------------------------------------------------
    node = property(lambda self: f"{self.prefix}-node", doc="the node's netns")
    pod = property(lambda self: f"{self.prefix}-pod", doc="the pod's netns")
    infra = property(lambda self: f"{self.prefix}-infra", doc="the uplink's far end")

    def gw(self, k: int) -> str:
        return f"{self.prefix}-gw{k}"

    @property
    def cali(self) -> str:
        return f"cali{self.prefix}"

    @property
    def pod_netns(self) -> str:
        """CNI_NETNS of the pod."""
        return f"/run/netns/{self.pod}"

    @property
    def namespaces(self) -> list[str]:
        return [self.node, self.pod, self.infra] + [self.gw(k) for k in range(1, self.rails + 1)]

    def pod_ip(self, family: str) -> str:
        return POD_IP4 if family == "4" else POD_IP6

    def node_ip(self, family: str) -> str:
        return NODE_IP4 if family == "4" else NODE_IP6

    def rail_ip(self, k: int, family: str) -> str:
        """The address host-local gives pod netK (first of rangeStart)."""
        return rail_addr(k, family, 10)

    def gw_ip(self, k: int, family: str) -> str:
        return rail_addr(k, family, 254)

    def behind_ip(self, k: int, family: str) -> str:
        return behind_addr(k, family)

    def rail_ranges(self, k: int) -> list[list[dict]]:
        """host-local `ranges` for pod netK: the one address `rail_ip` (see `runtime.rail_conflist`)."""
        return rail_ranges(k, self.family)

    def _build(self) -> None:
        v4, v6 = "4" in self.families, "6" in self.families
        ks = range(1, self.rails + 1)
        ip_batch([f"netns add {n}" for n in self.namespaces])
        # No DAD anywhere: the lab's addresses are unique by construction, and tentative
        # addresses (even the link-locals of a v4-only lab) would make the first probes and
        # the state snapshots flaky.  Set before links exist so every link inherits it,
        # including the macvlans the macvlan plugin creates in the node later.
        # The node forwards, as a Calico node does: proxy ARP on cali answers for
        # 169.254.1.1 only when the node has a forwarding route for it.
        node_sysctls = {"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1}
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: self._sysctls(n, {
                "net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0,
                **(node_sysctls if n == self.node else {})}), self.namespaces))
        node = ["link set lo up",
                f"link add uplink type veth peer name tonode netns {self.infra}",
                f"link add {self.cali} address {CALI_MAC} type veth peer name eth0 netns {self.pod}"]
        node += [f"link add rail{k} type veth peer name rail netns {self.gw(k)}" for k in ks]
        node += [f"link set {dev} up" for dev in ["uplink", self.cali] + [f"rail{k}" for k in ks]]
        if v4:
            node += [f"addr add {NODE_IP4}/24 dev uplink", f"route add {POD_IP4}/32 dev {self.cali} scope link",
                     f"route add default via {INFRA_IP4} dev uplink"]
        if v6:
            node += [f"addr add {NODE_IP6}/64 dev uplink nodad", f"route add {POD_IP6}/128 dev {self.cali}",
                     f"route add default via {INFRA_IP6} dev uplink"]
        ip_batch(node, self.node)
        # Calico's settings: answer ARP for 169.254.1.1 at once (proxy_delay 0).
        cali_sysctls: dict[str, str | int] = {f"net.ipv4.conf.{self.cali}.proxy_arp": 1,
                                              f"net.ipv4.neigh.{self.cali}.proxy_delay": 0}
        if v6:
            cali_sysctls[f"net.ipv6.conf.{self.cali}.proxy_ndp"] = 1

        pod = ["link set lo up", "link set eth0 up"]
        if v4:
            pod += [f"addr add {POD_IP4}/32 dev eth0",
                    f"route add {HIJACK_GW4} dev eth0 scope link",
                    f"route add default via {HIJACK_GW4} dev eth0"]
        if v6:
            pod += [f"addr add {POD_IP6}/128 dev eth0 nodad",
                    f"route add default via {CALI_LL6} dev eth0"]
        infra = ["link set lo up", "link set tonode up"]
        infra += [f"addr add {INFRA_IP4}/24 dev tonode"] if v4 else []
        infra += [f"addr add {INFRA_IP6}/64 dev tonode nodad"] if v6 else []
        jobs = [(self.pod, pod), (self.infra, infra)]
        for k in ks:
            gw = ["link set lo up", "link set rail up"]
            gw += [f"addr add {self.gw_ip(k, '4')}/24 dev rail", f"addr add {behind_addr(k, '4')}/32 dev lo"] if v4 else []
            gw += [f"addr add {self.gw_ip(k, '6')}/64 dev rail nodad",
                   f"addr add {behind_addr(k, '6')}/128 dev lo nodad"] if v6 else []
            jobs.append((self.gw(k), gw))
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ip_batch, lines, ns) for ns, lines in jobs]
            futures.append(pool.submit(self._sysctls, self.node, cali_sysctls))
            for fut in futures:
                fut.result()

def namespace_state(ns: str) -> dict:
    """A whole-state snapshot of `ns` for before/after comparisons.

    Kept: rules and every table's routes of both families (volatile fields dropped:
    expires, cache, metrics, flags such as linkdown), links (name, type, MAC, MTU,
    txqlen, master, admin flags), addresses, neighbours that someone configured
    (PERMANENT, or carrying a routing protocol tag such as route-tune's 231), and the
    sysctls route-tune may write (rp_filter, disable_ipv6, arp_ignore, arp_announce).
    Dropped: kernel-learned
    neighbours (REACHABLE/STALE/DELAY/PROBE/FAILED/INCOMPLETE) and NOARP entries the
    kernel makes for multicast/broadcast, which come and go with traffic.
    """
    # Without a family, `route show table all` lists both families; `rule show` only IPv4.
    rules4, routes, neigh, links, addrs = decode_many(ip_batch(
        ["rule show", "route show table all", "neigh show", "link show", "addr show"], ns, "-j", "-d"))
    (rules6,) = decode_many(ip_batch(["rule show"], ns, "-j", "-6"))
    routes4 = [r for r in routes if ":" not in r.get("dst", "") + r.get("gateway", "")]
    routes6 = [r for r in routes if r not in routes4]
    sysctl = run("ip", "netns", "exec", ns, "sysctl", "-a", "-r", r"\.(rp_filter|disable_ipv6|arp_ignore|arp_announce)$").stdout
    return {
        "rules4": rules4,
        "rules6": rules6,
        "routes4": _sort([_norm_route(r) for r in routes4]),
        "routes6": _sort([_norm_route(r) for r in routes6]),
        "neigh": _sort([n for n in neigh
                        if "PERMANENT" in n.get("state", []) or n.get("protocol")]),
        "links": _sort([{**{k: l[k] for k in _LINK_KEYS if k in l},
                         "kind": l.get("linkinfo", {}).get("info_kind", ""),
                         "flags": sorted(f for f in l.get("flags", []) if f not in ("LOWER_UP", "NO-CARRIER"))}
                        for l in links]),
        "addrs": _sort([{"dev": a["ifname"], "local": i["local"], "prefixlen": i["prefixlen"]}
                        for a in addrs for i in a.get("addr_info", [])]),
        "sysctl": dict(sorted(line.split(" = ", 1) for line in sysctl.splitlines() if " = " in line)),
    }


def changed(before: dict, after: dict) -> list[tuple[str, object, object]]:
    """``(key, before value, after value)`` of every key whose value differs, sorted by key."""
    return [(key, before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)]


def state_diff(before: dict, after: dict) -> str:
    """A readable difference of two `namespace_state()` snapshots ("" when equal)."""
    lines = []
    for key, a, b in changed(before, after):
        if isinstance(a, list) and isinstance(b, list):
            fmt = lambda d: json.dumps(d, sort_keys=True)  # noqa: E731
            sa, sb = [fmt(x) for x in a], [fmt(x) for x in b]
            lines += [f"{key}: - {x}" for x in sa if x not in sb]
            lines += [f"{key}: + {x}" for x in sb if x not in sa]
            if set(sa) == set(sb):
                lines.append(f"{key}: order changed")
        elif isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    lines.append(f"{key}: {k}: {a.get(k)!r} -> {b.get(k)!r}")
        else:
            lines.append(f"{key}: {a!r} -> {b!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m cniplugin.lab.topology PREFIX [--cleanup]`: build and print, or clean up."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(__doc__)
        return 2
    if "--cleanup" in argv:
        cleanup(argv[0])
        return 0
    with OverlayLab(argv[0]) as lab:
        print(json.dumps(lab.state(lab.pod), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
