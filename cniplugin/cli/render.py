"""Human text and JSON for the CLI's read commands.

Human output is ``ip``-style: every kernel object is printed the way ``ip rule`` / ``ip route``
print it, followed by its owner (``[route-tune]`` = protocol 231, ``[foreign]`` = anyone else),
so an operator can paste a line straight into ``ip``. JSON output carries the same facts as
plain objects (each with its ``text`` and ``owner``) for scripts.
"""

from __future__ import annotations

import json
from dataclasses import asdict
import os
import time

from cniplugin.cli.explain import Explanation
from cniplugin.cli.iptext import text, to_json
from cniplugin.cli.orphans import Orphans
from cniplugin.cli.reach import Reach
from cniplugin.cli.show import EngineDrift, InterfaceView, NodeView, PodView, Problem
from cniplugin.records.objects import Rule, table_name

_TAG_COLUMN = 70


def dump_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)


def _tag(obj) -> str:
    return "[route-tune]" if obj.owned else "[foreign]"


def _line(indent: str, obj) -> str:
    line = f"{indent}{text(obj)}"
    if isinstance(obj, Rule) and not (obj.src or obj.dst):
        line += f"  (IPv{obj.family})"  # `from all` says nothing about the family
    if len(line) < _TAG_COLUMN:
        return f"{line:<{_TAG_COLUMN}} {_tag(obj)}"
    return f"{line}  {_tag(obj)}"


def _problems(problems: list[Problem]) -> list[str]:
    if not problems:
        return ["problems: none"]
    return [f"PROBLEMS ({len(problems)}):"] + [f"  ! {p.kind}: {p.message}" for p in problems]


# -- show --------------------------------------------------------------------------------
def _interface(view: InterfaceView) -> list[str]:
    link = view.link
    addrs = "  ".join(a.cidr for a in view.addrs if not a.link_local) or "(no address)"
    head = f"{link.name} ({link.kind or 'device'}, {'up' if link.up else 'DOWN'}, {link.mac})"
    lines = [f"{head}  {addrs}"]
    if view.rules:
        lines.append("  rules selecting its table:")
        lines += [_line("    ", r) for r in view.rules]
    for table, routes in sorted(view.tables.items()):
        lines.append(f"  table {table_name(table)}:")
        lines += [_line("    ", r) for r in routes]
    if view.main_routes:
        lines.append("  main table routes via it:")
        lines += [_line("    ", r) for r in view.main_routes]
    if view.neighbours:
        lines.append("  neighbours:")
        lines += [_line("    ", n) for n in view.neighbours]
    return lines


def show_text(view: PodView) -> str:
    lines = [f"pod netns {view.netns} (inode {view.snap.inode})"]
    if view.attachments:
        lines.append(f"route-tune attachments (state dir {view.state_dir}):")
        for s in view.attachments:
            lines.append(f"  {s.container_id}/{s.ifname}  network {s.network}  table "
                         f"{s.desired.table}  {s.phase}")
    else:
        lines.append(f"route-tune attachments: none (no state file in {view.state_dir} "
                     f"names this netns)")
    for iface in view.interfaces:
        lines.append("")
        lines += _interface(iface)
    lines += ["", "other rules:"] + [_line("  ", r) for r in view.other_rules]
    for table, routes in sorted(view.other_tables.items()):
        lines.append(f"table {table_name(table)} (no interface's source rule selects it):")
        lines += [_line("  ", r) for r in routes]
    if view.node is not None:
        lines += [""] + _node(view.node)
    if view.engine_drift is not None:
        lines += [""] + _engine_drift(view.engine_drift)
    lines += [""] + _problems(view.problems)
    return "\n".join(lines)


def utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def _engine_drift(found: EngineDrift) -> list[str]:
    lines = [f"pod drift found by the resident engine (last check {utc(found.checked_at)}, "
             f"{found.checked} attachment(s) on the node compared):"]
    if not found.drifted:
        return lines + ["  none in this pod"]
    for entry in found.drifted:
        pod = "/".join(p for p in (entry.get("pod_namespace"), entry.get("pod_name")) if p)
        lines.append(f"  {f'pod {pod}, ' if pod else ''}attachment {entry.get('container_id')}/"
                     f"{entry.get('ifname')} (network {entry.get('network')}), drifted since "
                     f"{utc(entry.get('found_at', 0))}:")
        lines += [f"    {d}" for d in entry.get("drifts", [])]
    return lines


def _node(node: NodeView) -> list[str]:
    tables = ", ".join(map(str, node.host_rule_tables))
    lines = [f"node (netns inode {node.inode}), host peer {node.host_peer or '?'}, "
             f"hostRuleTable {tables}:"]
    if node.note:
        lines.append(f"  note: {node.note}")
    lines.append("  rules:")
    lines += [_line("    ", r) for r in node.rules] or ["    (none)"]
    lines.append(f"  table {tables} routes via {node.host_peer or 'the host peer'}:")
    lines += [_line("    ", r) for r in node.routes] or ["    (none)"]
    lines.append("  neighbours on the host peer:")
    lines += [_line("    ", n) for n in node.neighbours] or ["    (none)"]
    return lines


def show_json(view: PodView) -> dict:
    def iface(v: InterfaceView) -> dict:
        return {"name": v.link.name, "kind": v.link.kind, "mac": v.link.mac, "up": v.link.up,
                "addresses": [a.cidr for a in v.addrs if not a.link_local],
                "rules": [to_json(r) for r in v.rules],
                "tables": [{"table": t, "routes": [to_json(r) for r in routes]}
                           for t, routes in sorted(v.tables.items())],
                "main_routes": [to_json(r) for r in v.main_routes],
                "neighbours": [to_json(n) for n in v.neighbours]}
    out = {
        "netns": view.netns, "inode": view.snap.inode, "state_dir": view.state_dir,
        "attachments": [{"container_id": s.container_id, "ifname": s.ifname,
                         "network": s.network, "table": s.desired.table, "phase": s.phase}
                        for s in view.attachments],
        "interfaces": [iface(v) for v in view.interfaces],
        "other_rules": [to_json(r) for r in view.other_rules],
        "other_tables": [{"table": t, "routes": [to_json(r) for r in routes]}
                         for t, routes in sorted(view.other_tables.items())],
        "problems": [p.to_json() for p in view.problems],
        "facts": view.facts.to_dict() if view.facts is not None else None,
    }
    if view.engine_drift is not None:
        out["engine_drift"] = asdict(view.engine_drift)
    if view.node is not None:
        n = view.node
        out["node"] = {"inode": n.inode, "host_peer": n.host_peer,
                       "host_rule_tables": n.host_rule_tables, "note": n.note,
                       "rules": [to_json(r) for r in n.rules],
                       "routes": [to_json(r) for r in n.routes],
                       "neighbours": [to_json(x) for x in n.neighbours]}
    return out


# -- plan / verify -----------------------------------------------------------------------
def plan_text(desired, header: list[str]) -> str:
    lines = [f"# {h}" for h in header] + desired.render_lines()
    if desired.warnings:
        lines.append("# warnings:")
        lines += [f"#   {w}" for w in desired.warnings]
    return "\n".join(lines)


def _drift_lines(drift) -> list[str]:
    lines = [f"  - {drift.problem:<8} {drift.side}: {drift.expected.render()}"]
    if drift.problem != "missing":
        live = drift.live.render() if hasattr(drift.live, "render") else str(drift.live)
        lines.append(f"  + {'live':<8} {drift.side}: {live}")
    return lines


def verify_text(who: str, drifts: list, checked: int, notes: list[str]) -> str:
    lines = [f"verify {who}"] + [f"note: {n}" for n in notes]
    if not drifts:
        lines.append(f"no drift: all {checked} recorded objects are in place")
        return "\n".join(lines)
    lines.append(f"DRIFT: {len(drifts)} of {checked} recorded objects differ "
                 f"(- recorded by ADD, + what the kernel has instead)")
    for drift in drifts:
        lines += _drift_lines(drift)
    return "\n".join(lines)


def drift_json(drift) -> dict:
    live = drift.live
    return {"side": drift.side, "problem": drift.problem, "expected": drift.expected.render(),
            "live": live.render() if hasattr(live, "render") else live,
            "text": drift.describe()}


# -- explain -----------------------------------------------------------------------------
def _flow_text(e: Explanation) -> str:
    f = e.flow
    words = [f"{f.dst}"]
    words += [f"from {f.src}"] if f.src else []
    words += [f"iif {f.iif}"] if f.iif else []
    words += [f"mark {f.mark:#x}"] if f.mark else []
    return " ".join(words) + f" (IPv{f.family})"


def _walk_answer(e: Explanation) -> str:
    if e.errno:
        return f"lookup fails: {os.strerror(e.errno)}"
    route = text(e.route) if e.route else "?"
    via = f" via {e.gateway}" if e.gateway else ""
    return (f"table {table_name(e.table or 0)}, route `{route}` {_tag(e.route)}, "
            f"out {'|'.join(e.devs)}{via}")


def _kernel_answer(e: Explanation) -> str:
    if e.kernel is None:
        return f"lookup fails: {e.kernel_error}"
    k = e.kernel
    words = [f"table {table_name(k.table)}, dev {k.dev}"]
    words += [f"via {k.gateway}"] if k.gateway else []
    words += [f"src {k.prefsrc}"] if k.prefsrc else []
    return " ".join(words)


def explain_text(netns: str, e: Explanation) -> str:
    lines = [f"explain {_flow_text(e)} in {netns}", "rules, in priority order:"]
    for step in e.steps:
        mark = "->" if step.verdict == "match" else "  "
        lines.append(f"  {mark} {text(step.rule):<58} {step.verdict}: {step.reason}")
        if step.outcome:
            lines.append(f"       {step.outcome}")
    if e.why:
        lines.append(f"why: {e.why}")
    lines.append(f"route-tune's walk: {_walk_answer(e)}")
    lines.append(f"kernel (its own route get): {_kernel_answer(e)}")
    if e.agree:
        lines.append("agreement: the walk and the kernel agree")
    else:
        lines.append("!" * 72)
        lines.append(f"!!! DISAGREEMENT: {e.disagreement}")
        lines.append("!!! trust the kernel's answer; the walk misses something (please report)")
        lines.append("!" * 72)
    lines += [f"note: {n}" for n in e.notes]
    return "\n".join(lines)


def explain_json(netns: str, e: Explanation) -> dict:
    k = e.kernel
    return {
        "netns": netns,
        "flow": {"family": e.flow.family, "dst": e.flow.dst, "src": e.flow.src,
                 "iif": e.flow.iif, "mark": e.flow.mark},
        "steps": [{"rule": to_json(s.rule), "verdict": s.verdict, "reason": s.reason,
                   "outcome": s.outcome} for s in e.steps],
        "walk": {"table": e.table, "route": to_json(e.route) if e.route else None,
                 "dev": e.dev, "devs": list(e.devs), "gateway": e.gateway,
                 "error": os.strerror(e.errno) if e.errno else "", "why": e.why},
        "kernel": ({"table": k.table, "dev": k.dev, "gateway": k.gateway, "prefsrc": k.prefsrc,
                    "error": ""} if k else {"error": e.kernel_error}),
        "agree": e.agree, "disagreement": e.disagreement, "notes": e.notes,
    }


# -- reach -------------------------------------------------------------------------------
_REACH_HEAD = ("rail", "source", "table", "dev", "via", "reply on", "rtt")


def _reach_row(p) -> tuple[str, ...]:
    r = p.route
    rtt = f"{p.echo.rtt_ms:.3f} ms" if p.echo and p.echo.answered else "-"
    return (p.rail or "unbound", p.source or "-", table_name(r.table) if r else "-",
            r.dev if r else "-", (r.gateway or "direct") if r else "-", p.reply_dev or "-", rtt)


def reach_text(r: Reach, attempts: int, timeout: str) -> str:
    rows = [_REACH_HEAD] + [_reach_row(p) for p in r.paths]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_REACH_HEAD) - 1)]
    lines = [f"reach {r.peer} (IPv{r.family}) from {r.netns}: the kernel's route per source, "
             f"then up to {attempts} ICMP echo(es), {timeout} apart"]
    for row, path in zip(rows, [None] + r.paths):
        cells = "  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths))
        verdict = "result" if path is None else (
            f"FAILED: {path.problem}" if path.problem else "ok")
        lines.append(f"{cells}  {row[-1]:>10}  {verdict}")
    bad = sum(1 for p in r.paths if p.problem)
    lines.append(f"{len(r.paths) - bad} of {len(r.paths)} paths answered on the interface "
                 f"their request left by")
    return "\n".join(lines)


def reach_json(r: Reach) -> dict:
    def path(p) -> dict:
        k, e = p.route, p.echo
        return {"rail": p.rail, "bound": p.bound, "source": p.source,
                "table": k.table if k else None, "dev": k.dev if k else "",
                "gateway": k.gateway if k else "", "route_error": p.route_error,
                "answered": bool(e and e.answered), "reply_dev": p.reply_dev,
                "rtt_ms": e.rtt_ms if e else None, "problem": p.problem, "ok": not p.problem}
    return {"netns": r.netns, "peer": r.peer, "family": r.family,
            "paths": [path(p) for p in r.paths], "ok": r.ok}


# -- orphans -----------------------------------------------------------------------------
def orphans_text(o: Orphans, removing: bool) -> str:
    lines = [f"node netns inode {o.node_inode}, state dir {o.state_dir}, hostRuleTable(s) "
             f"{', '.join(map(str, o.tables)) or '-'}"]
    if o.objects:
        lines.append(f"route-tune node entries no state file lists ({len(o.objects)}):")
        lines += [_line("  ", obj) for obj in o.objects]
    else:
        lines.append("route-tune node entries no state file lists: none")
    if o.stale_states:
        lines.append(f"state files whose pod is gone ({len(o.stale_states)}):")
        lines += [f"  {s.container_id}/{s.ifname} (network {s.network}): {why}"
                  for s, why in o.stale_states]
    else:
        lines.append("state files whose pod is gone: none")
    if removing:
        lines += [f"removed: {r}" for r in o.removed]
        lines += [f"FAILED: {e}" for e in o.errors]
    elif o.objects or o.stale_states:
        lines.append("run again with --remove to clean these up")
    return "\n".join(lines)


def orphans_json(o: Orphans) -> dict:
    return {"node_inode": o.node_inode, "state_dir": o.state_dir, "tables": o.tables,
            "objects": [to_json(obj) for obj in o.objects],
            "stale_states": [{"container_id": s.container_id, "ifname": s.ifname,
                              "network": s.network, "netns": s.netns, "why": why}
                             for s, why in o.stale_states],
            "removed": o.removed, "errors": o.errors}
