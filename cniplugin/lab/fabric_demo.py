"""`cni-route-tune demo --nodes N`: the guide's end state on N nodes and the cross-node matrix.

Builds the fabric lab (cniplugin.lab.fabric), ADDs every pod's rails through libcni, prints each
node's pod rules and node rule/table, then for every rail (and family) one TCP stream from pod A
(node 1) to pod B (node 2) with the source bound to A's netK and one unbound, and shows which
interface each flow left and arrived on in both pods (per-flow counters, lab.flows). DELs
everything and checks that every node and pod is as before the ADDs.
"""

from __future__ import annotations

import argparse
import os
import time

from .demo import FAMILY_NAME, route_table, section
from .fabric import FabricLab, FabricPods
from .flows import Flow, FlowPath, run_flows
from .runtime import CniFailure, build_cnirunner
from .topology import LabError, state_diff


def _show_state(lab: FabricLab) -> None:
    fams = [f"-{f}" for f in lab.families]
    for i in lab.node_ids:
        for fam in fams:
            section(f"node {i} pod: ip {fam} rule", lab.ip(lab.pod(i), fam, "rule", "show"))
        section(f"node {i} pod: table 101", "".join(route_table(lab.pod(i), fam, "101") for fam in fams))
        section(f"node {i}: table 500", "".join(route_table(lab.node(i), fam, "500") for fam in fams))


def _cell(ifaces: dict[str, int]) -> str:
    return ",".join(sorted(ifaces)) or "-"


def matrix(lab: FabricLab) -> tuple[list[str], bool]:
    """Per rail and family: A netK -> B netK bound and unbound, the interfaces in both pods."""
    flows, meta, port = [], [], 20000
    for fam in lab.families:
        for k in lab.rail_ids:
            for bound in (True, False):
                src = lab.rail_ip(1, k, fam) if bound else ""
                flows.append(Flow(lab.pod(1), lab.pod(2), src, lab.rail_ip(2, k, fam), port))
                meta.append((k, bound))
                port += 1
    paths: list[FlowPath] = run_flows(flows, size=1 << 20)
    head = f"{'rail':<6}{'source (A)':<18}{'to (B)':<18}{'A out':<7}{'B in':<7}{'B out':<7}{'A in':<7}result"
    lines, all_ok = [head], True
    for (k, bound), path in zip(meta, paths):
        a_out, b_in, b_out, a_in = (_cell(d) for d in (path.client_out, path.server_in, path.server_out,
                                                        path.client_in))
        # Bound: the whole flow on netK. Unbound: the kernel's choice (separate subnets: netK's own
        # connected route; one shared subnet: main's first rail), and the reply takes it back.
        symmetric = a_out == a_in and b_in == b_out == f"net{k}"
        good = path.ok and symmetric and (not bound or a_out == f"net{k}")
        all_ok &= good
        src = path.local + ("" if bound else " *")
        lines.append(f"net{k:<2} {src:<18}{path.flow.dst:<18}{a_out:<7}{b_in:<7}{b_out:<7}{a_in:<7}"
                     + ("ok" if good else f"FAIL {path.error}"))
    lines.append("(* unbound: the source the kernel chose)")
    return lines, all_ok


def run_fabric_demo(args: argparse.Namespace) -> int:
    prefix = f"rtfab{os.getpid() % 100000}"
    print(f"route-tune demo: {args.nodes} nodes x {args.rails} rails ({FAMILY_NAME[args.family]}, "
          f"{args.mode}, {args.layout} subnets), chains [macvlan -> route-tune] through libcni 1.1.2 (Debian)")
    runner = build_cnirunner()
    lab = FabricLab(prefix, nodes=args.nodes, rails=args.rails, family=args.family, mode=args.mode,
                    layout=args.layout).__enter__()
    ok = True
    try:
        print(f"lab: nodes {lab.node(1)}..{lab.node(args.nodes)}, pods {lab.pod(1)}.., leaves "
              f"{lab.leaf(1)}..{lab.leaf(args.rails)} joined by {lab.spine}")
        names = [lab.node(i) for i in lab.node_ids] + [lab.pod(i) for i in lab.node_ids]
        before = {ns: lab.state(ns) for ns in names}
        pods = FabricPods(lab, runner=runner)
        start = time.monotonic()
        pods.add_all()
        print(f"ADD   net1..net{args.rails} on {args.nodes} nodes: ok ({time.monotonic() - start:.1f} s)")
        _show_state(lab)
        print("--- cross-node matrix: pod A (node 1) -> pod B (node 2), a 1 MiB echo per flow; "
              "interfaces counted per flow in both pods")
        lines, ok = matrix(lab)
        print("\n".join(lines))
        start = time.monotonic()
        pods.delete_rails()
        pods.teardown_eth0()
        print(f"DEL   every rail on every node: ok ({time.monotonic() - start:.1f} s)")
        for ns in names:
            diff = state_diff(before[ns], lab.state(ns))
            ok &= not diff
            print(f"state: {ns} equals its pre-ADD state" if not diff else f"state: {ns} DIFFERS:\n{diff}")
    except (CniFailure, LabError) as exc:
        print(f"FAILED: {exc}")
        return 1
    finally:
        lab.close()
    print("result: every rail carries its flows on the same NIC both ways, on both nodes" if ok else "result: FAILED")
    return 0 if ok else 1
