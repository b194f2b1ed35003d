"""`cni-route-tune demo`: the 8-rail AI pod, end to end through libcni, then torn down.

`--nodes N` (N >= 2) runs `fabric_demo` instead: pods on N nodes and the cross-node matrix.

Builds the lab (cniplugin.lab.topology), runs `[macvlan, route-tune]` for net1..net8
through Debian's libcni (our Go runner), prints the pod's rules and tables and the node's
rule and table, one connectivity line per rail, runs CHECK, DELs every chain in reverse
and verifies that pod and node are exactly as before the first ADD.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from .runtime import CniFailure, Libcni, PluginEnv, RailPod, build_cnirunner
from .topology import LabError, OverlayLab, run, state_diff

FAMILY_NAME = {"4": "IPv4", "6": "IPv6", "dual": "dual stack"}


def section(title: str, text: str) -> None:
    """Print `text` indented under `--- title` ("(empty)" when there is none)."""
    print(f"--- {title}")
    body = "\n".join(line.rstrip() for line in text.strip().splitlines())
    print("\n".join("    " + line for line in body.splitlines()) if body else "    (empty)")


def _rule_tables(lab: OverlayLab) -> dict[str, str]:
    """Pod source address → the table its rule selects (both families)."""
    out = {}
    for fam in ("-4", "-6"):
        for rule in json.loads(lab.ip(lab.pod, "-j", fam, "rule", "show")):
            if rule.get("src", "all") != "all":
                out[rule["src"]] = str(rule.get("table"))
    return out


def route_table(ns: str, fam: str, table: str) -> str:
    """`ip route show table T`; a table that does not exist (yet) is simply empty."""
    return run("ip", "-n", ns, fam, "route", "show", "table", table, check=False).stdout


def _show_state(lab: OverlayLab, fams: list[str]) -> None:
    for fam in fams:
        section(f"pod: ip {fam} rule", lab.ip(lab.pod, fam, "rule", "show"))
    tables = ["100"] + [str(100 + k) for k in range(1, lab.rails + 1)] + ["main"]
    for table in tables:
        text = "".join(route_table(lab.pod, fam, table) for fam in fams)
        section(f"pod: table {table}", text)
    for fam in fams:
        section(f"node: ip {fam} rule", lab.ip(lab.node, fam, "rule", "show"))
    section("node: table 500", "".join(route_table(lab.node, fam, "500") for fam in fams))


def connectivity(lab: OverlayLab) -> tuple[list[str], bool]:
    """One line per rail and family: gateway and behind-gateway pings from the rail address,
    with the interface the kernel picks for them; returns (lines, all ok)."""
    tables = _rule_tables(lab)
    pairs, meta = [], []
    for k in range(1, lab.rails + 1):
        for fam in lab.families:
            src = lab.rail_ip(k, fam)
            pairs += [(src, lab.gw_ip(k, fam)), (src, lab.behind_ip(k, fam))]
            meta.append((k, fam, src))
    pings = lab.ping_many(lab.pod, pairs)
    lines, all_ok = [], True
    for i, (k, fam, src) in enumerate(meta):
        parts = []
        for dst, ping in ((lab.gw_ip(k, fam), pings[2 * i]), (lab.behind_ip(k, fam), pings[2 * i + 1])):
            dev = lab.route_get(lab.pod, dst, src).get("dev", "?")
            good = ping["ok"] and dev == f"net{k}"
            all_ok &= good
            rtt = f" {ping['rtt_ms']:.2f} ms" if ping["ok"] else f" ({ping['error']})"
            parts.append(f"-> {dst} via {dev}" + (f" (table {tables.get(src, '?')})" if not parts else "")
                         + (" ok" if good else " FAIL") + rtt)
        lines.append(f"net{k}  {src:<16} " + " | ".join(parts))
    return lines, all_ok


def run_demo(args: argparse.Namespace) -> int:
    prefix = f"rtdemo{os.getpid() % 100000}"
    keys = {"detectGateway": True, "detectIPConflict": True} if args.detect else {}
    checks = "gateway + IP-conflict checks on" if args.detect else "no gateway/conflict checks"
    print(f"route-tune demo: {args.rails}-rail pod ({FAMILY_NAME[args.family]}), "
          f"chains [macvlan -> {args.chained}] through libcni 1.1.2 (Debian), {checks}")
    runner = build_cnirunner()
    lab = OverlayLab(prefix, rails=args.rails, family=args.family)
    lab.__enter__()
    fams = [f"-{f}" for f in lab.families]
    penv = PluginEnv(lab.tmp / "plugin", family=args.family)
    pod = RailPod(lab, penv, Libcni(lab.node, penv, runner), keys=keys,
                  chained=args.chained)
    ok, keep = True, args.keep
    try:
        print(f"lab: node={lab.node} pod={lab.pod} gateways={lab.gw(1)}..{lab.gw(args.rails)} "
              f"(state: {penv.workdir})")
        before = {ns: lab.state(ns) for ns in (lab.pod, lab.node)}
        start = time.monotonic()
        pod.add_all()
        print(f"ADD   net1..net{args.rails}: ok ({(time.monotonic() - start) * 1000:.0f} ms for "
              f"{args.rails} chains)")
        _show_state(lab, fams)
        print("--- connectivity (from each rail address; the ping proves the path: only gateway K has "
              "198.18.K.1)")
        lines, ok = connectivity(lab)
        print("\n".join(lines))
        for k in pod.rails:
            pod.check(k)
        print(f"CHECK net1..net{args.rails}: ok")
        if keep:
            print(f"--keep: lab left in place; remove with: python -m cniplugin.lab.topology {prefix}- --cleanup")
            return 0 if ok else 1
        start = time.monotonic()
        pod.delete_all()
        print(f"DEL   net{args.rails}..net1: ok ({(time.monotonic() - start) * 1000:.0f} ms)")
        for ns, label in ((lab.pod, "pod"), (lab.node, "node")):
            diff = state_diff(before[ns], lab.state(ns))
            ok &= not diff
            print(f"state: {label} equals its pre-ADD state" if not diff
                  else f"state: {label} DIFFERS from its pre-ADD state:\n{diff}")
    except (CniFailure, LabError) as exc:
        print(f"FAILED: {exc}")
        return 1
    finally:
        if not keep:
            lab.close()
    print("result: all rails reach their gateways with the right source and NIC" if ok else "result: FAILED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cni-route-tune demo", description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("4", "6", "dual"), default="4")
    parser.add_argument("--rails", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--no-detect", dest="detect", action="store_false",
                        help="turn off detectGateway/detectIPConflict (on by default)")
    parser.add_argument("--detect", dest="detect", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chained", default="route-tune", help=argparse.SUPPRESS)  # e.g. sbr, to test the lab
    parser.add_argument("--keep", action="store_true", help="leave the pod set up (no DEL, no teardown)")
    parser.add_argument("--nodes", type=int, default=1,
                        help="2 or more: pods on that many nodes joined by a rail fabric, and the cross-node matrix")
    parser.add_argument("--mode", choices=("overlay", "underlay"), default="overlay", help="with --nodes")
    parser.add_argument("--layout", choices=("separate", "shared"), default="separate",
                        help="with --nodes: a subnet per rail, or one subnet for all rails")
    args = parser.parse_args(argv)
    if not 1 <= args.nodes <= 9:
        parser.error("--nodes must be 1..9")
    if os.geteuid() != 0 or not shutil.which("ip"):
        print("the demo needs root and iproute2 (it only touches network namespaces it creates)", file=sys.stderr)
        return 2
    if args.nodes > 1:
        from .fabric_demo import run_fabric_demo
        return run_fabric_demo(args)
    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
