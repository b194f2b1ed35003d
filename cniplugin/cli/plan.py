"""``plan`` and ``verify``: the engine's planner and CHECK, for a request from saved files."""

from __future__ import annotations

import os
import sys

from cniplugin.cli.common import (EXIT_OK, EXIT_PROBLEM, UsageError, close, emit, open_node,
                                  read_json, subcommand)
from cniplugin.cli.request import build_invocation, request_options


# -- plan ----------------------------------------------------------------------------------
def _plan_options(p) -> None:
    request_options(p)
    p.add_argument("--facts", metavar="FILE",
                   help="facts JSON saved by `cni-route-tune facts` (or `show --json`)")


def _saved_facts(path: str):
    from cniplugin.records.facts import Facts
    data = read_json(path, "facts")
    if isinstance(data, dict) and isinstance(data.get("facts"), dict):
        data = data["facts"]  # a saved `show --json`
    try:
        return Facts.from_dict(data)
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"facts {path}: not a facts dump ({err})") from None


def _plan(args) -> int:
    from cniplugin.cli import render as _render
    from cniplugin.engine import commands as _engine
    from cniplugin.engine.gather import assumed_facts, planning_input
    from cniplugin.protocol.errors import IOFailure
    inv, _ = build_invocation(args, "ADD")
    if args.facts:
        facts, source = _saved_facts(args.facts), args.facts
    else:
        facts, source = assumed_facts(inv), "derived from prevResult alone"
    header = [f"plan: ADD of {inv.ifname} for network {inv.raw.get('name')} (container "
              f"{inv.container_id})", f"facts: {source}"]
    if inv.disabled:
        emit(args, {"mode": "disabled", "lines": []},
             "\n".join(f"# {h}" for h in header) + "\n# mode disabled: ADD passes prevResult "
             "through and installs nothing")
        return EXIT_OK
    gathered = planning_input(inv, facts)
    try:
        desired = _engine.plan_for(inv, gathered)
    except IOFailure as err:  # the state dir is root's: plan as a first ADD
        header.append(f"state not readable ({err.msg}): planned as a first ADD")
        desired = _engine.plan_for(inv.replace(state_dir="/nonexistent"), gathered)
    data = {"network": inv.raw.get("name"), "ifname": inv.ifname,
            "container_id": inv.container_id, "facts": source,
            "lines": desired.render_lines(), "warnings": list(desired.warnings),
            "desired": desired.to_dict()}
    emit(args, data, _render.plan_text(desired, header))
    return EXIT_OK


cmd_plan = subcommand(
    "plan", "Print what ADD would install for a saved config + prevResult, as the ip commands "
            "of the plan. Changes nothing, needs no root and enters no namespace: the observed "
            "facts come from --facts (saved by `cni-route-tune facts`) or, without it, are "
            "derived from prevResult alone (no eth0 address, no node: no table 100, cluster "
            "routes or node side).",
    _plan, _plan_options, "json")


# -- verify --------------------------------------------------------------------------------
def _find_attachment(store, pod_inode: int, network: str, ifname: str, container_id: str):
    """The pod's state for ``network`` (narrowed by ifname / container id when known)."""
    from cniplugin.cli import live as _live
    found = [s for s in _live.states_of_pod(store, pod_inode) if s.network == network
             and ifname in ("", s.ifname) and container_id in ("", s.container_id)]
    if len(found) > 1:
        raise UsageError(f"network {network} has {len(found)} attachments in this pod "
                         f"({', '.join(s.ifname for s in found)}): pick one with --ifname")
    return found[0] if found else None


def _verify(args) -> int:
    from cniplugin.cli import live as _live
    from cniplugin.cli import render as _render
    from cniplugin.engine.store import Store
    inv, named = build_invocation(args, "CHECK", need_ifname=False)
    store = Store(args.state_dir or inv.state_dir)
    path = _live.resolve_netns(args.netns, store)
    pod_fd = _live.open_netns(path)
    node_fd = None
    try:
        node_fd = open_node(args)
        pod_inode = os.fstat(pod_fd).st_ino
        state = _find_attachment(store, pod_inode, inv.network, named.ifname,
                                 named.container_id)
        if state is None:
            sys.stderr.write(f"cni-route-tune verify: no route-tune state for network "
                             f"{inv.network} in {path} (state dir "
                             f"{os.path.dirname(store.root)}): was ADD run for it?\n")
            return EXIT_PROBLEM
        drifts = _live.state_drift(state, pod_fd, node_fd)
        node_inode = _live.netns_inode(node_fd)
    finally:
        close(pod_fd, node_fd)
    notes, checked = [], len(state.desired.pod_objects())
    if state.node_inode != node_inode and state.desired.node_objects():
        drifts = [d for d in drifts if d.side != "node"]
        notes.append("node side not compared: this is not the node netns ADD ran in "
                     "(run on the node, or give --node-netns)")
    else:
        checked += len(state.desired.node_objects())
    who = (f"network {state.network}, attachment {state.container_id}/{state.ifname} "
           f"(table {state.desired.table}) in {path}")
    data = {"network": state.network, "container_id": state.container_id,
            "ifname": state.ifname, "netns": path, "checked": checked, "notes": notes,
            "drift": [_render.drift_json(d) for d in drifts], "ok": not drifts}
    emit(args, data, _render.verify_text(who, drifts, checked, notes))
    return EXIT_PROBLEM if drifts else EXIT_OK


cmd_verify = subcommand(
    "verify", "Run the CHECK engine (the attachment's recorded objects vs the kernel) and print "
              "the differences as a diff; exit 1 on drift. The attachment is found by "
              "--ifname/--container-id (or the env file), else by the config's network name "
              "among the pod's state files.",
    _verify, request_options, "netns", "state-dir", "node-netns", "json")
