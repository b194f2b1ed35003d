"""``show``, ``facts`` and ``orphans``: reading a pod's or the node's live state."""

from __future__ import annotations

from cniplugin.cli.common import (EXIT_OK, EXIT_PROBLEM, close, emit, host_rule_table,
                                  open_node, pod_default_nic, state_dir, subcommand)


# -- show ----------------------------------------------------------------------------------
def _show_options(p) -> None:
    p.add_argument("--netns", required=True, metavar="NAME|PATH",
                   help="a name under /run/netns, a path (/proc/PID/ns/net, /var/run/netns/X), "
                        "or a container id that has route-tune state")
    p.add_argument("--node", action="store_true",
                   help="add the node-side entries for this pod (run on the node, or give "
                        "--node-netns)")
    p.add_argument("--pod-default-nic", metavar="IF",
                   help="the cluster CNI's interface (default: podDefaultCniNic, else eth0)")


def _show(args) -> int:
    from cniplugin.cli import live as _live
    from cniplugin.cli import render as _render
    from cniplugin.cli.show import build_pod_view
    from cniplugin.engine.store import Store
    store = Store(state_dir(args))
    path = _live.resolve_netns(args.netns, store)
    pod_fd = _live.open_netns(path)
    node_fd = None
    try:
        node_fd = open_node(args)
        view = build_pod_view(path, pod_fd, store, node_fd, args.node, host_rule_table(),
                              pod_default_nic(args))
    finally:
        close(pod_fd, node_fd)
    emit(args, _render.show_json(view), _render.show_text(view))
    return EXIT_PROBLEM if view.problems else EXIT_OK


cmd_show = subcommand(
    "show", "A pod's policy routing, grouped per interface: addresses, the rules selecting the "
            "interface's table, the table's routes, main-table routes and neighbours; each "
            "marked [route-tune] (protocol 231) or [foreign]; then the problems found. Needs "
            "root.",
    _show, _show_options, "state-dir", "node-netns", "json")


# -- facts ---------------------------------------------------------------------------------
def _ifname_option(p) -> None:
    p.add_argument("--ifname", metavar="IF",
                   help="gather as the ADD of this interface would (its mode decides which "
                        "host peer the node facts follow); default: as for a next secondary "
                        "interface")


def _facts(args) -> int:
    from cniplugin.cli import live as _live
    from cniplugin.cli import render as _render
    from cniplugin.engine.gather import gather_facts
    from cniplugin.protocol.config import PluginConfig
    config = PluginConfig.model_validate({"podDefaultCniNic": pod_default_nic(args)})
    path = _live.resolve_netns(args.netns)
    pod_fd = _live.open_netns(path)
    node_fd = None
    try:
        node_fd = open_node(args)
        facts = gather_facts(pod_fd, node_fd, config, args.ifname or "")
    finally:
        close(pod_fd, node_fd)
    print(_render.dump_json(facts.to_dict()))
    return EXIT_OK


cmd_facts = subcommand(
    "facts", "Dump what the planner sees for a pod (the engine's own gather) as JSON; save it "
             "for `plan --facts`. Node facts need the node netns (run on the node, or give "
             "--node-netns). Needs root.",
    # --json is accepted for symmetry: the output is always JSON
    _facts, "netns", "pod-default-nic", _ifname_option, "node-netns", "json")


# -- orphans -------------------------------------------------------------------------------
def _orphans_options(p) -> None:
    from cniplugin.records.defaults import HOST_RULE_TABLE
    p.add_argument("--remove", action="store_true", help="remove what was found")
    p.add_argument("--host-rule-table", type=int, action="append", metavar="T",
                   help="also look in this table (default: the node defaults' hostRuleTable, "
                        f"{HOST_RULE_TABLE}, and every table a route-tune node rule looks up)")


def _orphans(args) -> int:
    from cniplugin.cli import render as _render
    from cniplugin.cli.orphans import find_orphans, remove_orphans
    from cniplugin.engine.store import Store
    store = Store(state_dir(args))
    tables = set(args.host_rule_table or [host_rule_table()])
    node_fd = open_node(args)
    try:
        found = find_orphans(store, node_fd, tables)
        if args.remove:
            remove_orphans(found, store, node_fd)
    finally:
        close(node_fd)
    emit(args, _render.orphans_json(found), _render.orphans_text(found, args.remove))
    if args.remove:
        return EXIT_PROBLEM if found.errors else EXIT_OK
    return EXIT_PROBLEM if found.objects or found.stale_states else EXIT_OK


cmd_orphans = subcommand(
    "orphans", "Recover a node by hand: list route-tune's node entries (rules, hostRuleTable "
               "routes and neighbours with protocol 231) that no state file lists, and state "
               "files whose pod netns is gone. --remove cleans them: stale states through the "
               "engine's DEL (node side), then the unlisted entries under the node lock. Run it "
               "on the node (or give --node-netns). Needs root.",
    _orphans, _orphans_options, "state-dir", "node-netns", "json")
