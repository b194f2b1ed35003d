"""``explain`` and ``probe``: what a packet does in a pod, checked against the kernel."""

from __future__ import annotations

from cniplugin.cli.common import EXIT_OK, EXIT_PROBLEM, UsageError, close, emit, subcommand


# -- explain -------------------------------------------------------------------------------
def _explain_options(p) -> None:
    p.add_argument("dst", metavar="DST", help="destination address")
    p.add_argument("--from", dest="src", metavar="SRC", help="source address")
    p.add_argument("--iif", metavar="IF", help="input interface (an arriving packet)")
    p.add_argument("--mark", type=lambda s: int(s, 0), default=0, metavar="N",
                   help="firewall mark (fwmark rules)")


def _explain(args) -> int:
    import ipaddress
    try:
        family = ipaddress.ip_address(args.dst).version
        if args.src and ipaddress.ip_address(args.src).version != family:
            raise UsageError(f"--from {args.src} and {args.dst} are of different families")
    except ValueError as err:
        raise UsageError(str(err)) from None
    from cniplugin.cli import explain as _explain
    from cniplugin.cli import live as _live
    from cniplugin.cli import render as _render
    from cniplugin.protocol.errors import InterfaceNotFound
    path = _live.resolve_netns(args.netns)
    pod_fd = _live.open_netns(path)
    try:
        flow = _explain.Flow(family, str(ipaddress.ip_address(args.dst)),
                             str(ipaddress.ip_address(args.src)) if args.src else "",
                             args.iif or "", args.mark)
        result = _explain.explain(pod_fd, flow)
    except InterfaceNotFound as err:
        raise UsageError(err.msg) from None
    finally:
        close(pod_fd)
    emit(args, _render.explain_json(path, result), _render.explain_text(path, result))
    return EXIT_OK if result.agree else EXIT_PROBLEM


cmd_explain = subcommand(
    "explain", "Walk the pod's rules in priority order (from/to/iif/fwmark, "
               "lookup/goto/nop/unreachable/prohibit/blackhole, suppress_prefixlength, throw "
               "routes) and say which rule, table, route and interface a packet to DST takes, "
               "and why; the kernel's own answer (route get with RTM_F_LOOKUP_TABLE) is printed "
               "beside it and compared. Exit 1 if they disagree. Needs root.",
    _explain, _explain_options, "netns", "json")


# -- probe ---------------------------------------------------------------------------------
def _probe_options(p) -> None:
    p.add_argument("--netns", required=True, metavar="NAME|PATH")
    p.add_argument("--ifname", required=True, metavar="IF")
    p.add_argument("--gateway", action="append", metavar="GW",
                   help="gateway to probe (repeatable; 'auto' = IF's default-route gateways)")
    p.add_argument("--conflict", action="store_true", help="probe IF's addresses for conflicts")
    p.add_argument("--retries", type=int, default=3, help="probes per address (default 3)")
    p.add_argument("--interval", default="10ms", help="between probes (Go duration, 10ms)")
    p.add_argument("--timeout", default="100ms", help="wait after the last probe (100ms)")


def _probe(args) -> int:
    from cniplugin.cli import live as _live
    from cniplugin.kernel import netns as _netns
    from cniplugin.kernel import probe
    from cniplugin.protocol.config import parse_go_duration
    from cniplugin.protocol.errors import CNIError
    try:
        opts = probe.ProbeOptions(args.retries, parse_go_duration(args.interval),
                                  parse_go_duration(args.timeout))
    except ValueError as err:
        raise UsageError(str(err)) from None
    path = _live.resolve_netns(args.netns)
    pod_fd = _live.open_netns(path)
    try:
        snap = _live.snapshot(pod_fd)
        if not any(link.name == args.ifname for link in snap.links):
            raise UsageError(f"no interface {args.ifname} in {path}")
        addrs = [a.cidr for a in snap.addrs_of(args.ifname) if not a.link_local]
        gateways = list(args.gateway or ([] if args.conflict else ["auto"]))
        if "auto" in gateways:
            gateways.remove("auto")
            gateways += sorted({r.gateway for r in snap.routes if r.is_default and r.gateway
                                and r.dev == args.ifname and not r.gateway.startswith("fe80")})
        results = {}
        with _netns.entered(pod_fd):
            for kind in (["conflict"] if args.conflict or not args.gateway else []) + (
                    ["gateway"] if gateways else []):
                if kind == "gateway" and results.get("conflict", {}).get("ok") is False:
                    results[kind] = {"ok": None, "error": "an address conflicts (#4475)"}
                    continue
                try:
                    probe.probe_interface(args.ifname, addrs, gateways, opts,
                                          conflict=kind == "conflict", gateway=kind == "gateway")
                    results[kind] = {"ok": True, "error": ""}
                except (CNIError, ValueError) as err:
                    results[kind] = {"ok": False, "error": getattr(err, "msg", str(err))}
    finally:
        close(pod_fd)
    lines = [f"probe {args.ifname} in {path}: addresses {', '.join(addrs) or '(none)'}; "
             f"{opts.retries} probes, interval {args.interval}, timeout {args.timeout}"]
    for kind, res in results.items():
        what = ("conflict check of " + ", ".join(addrs) if kind == "conflict"
                else "gateway " + ", ".join(gateways))
        verdict = {True: "ok", False: "FAILED", None: "skipped"}[res["ok"]]
        lines.append(f"{what}: {verdict}" + (f": {res['error']}" if res["error"] else ""))
    if not results:
        lines.append("nothing to probe: no gateway found (give --gateway) and no --conflict")
    data = {"netns": path, "ifname": args.ifname, "addresses": addrs, "gateways": gateways,
            **results}
    emit(args, data, "\n".join(lines))
    failed = any(res["ok"] is False for res in results.values())
    return EXIT_PROBLEM if failed or not results else EXIT_OK


cmd_probe = subcommand(
    "probe", "The gateway and IP-conflict checks by hand, inside the pod: ARP/NDP from IF's "
             "addresses. Without --gateway or --conflict both run (the gateway taken from IF's "
             "default routes); the conflict check runs first and a conflict skips the gateway "
             "probe (#4475). Needs root.",
    _probe, _probe_options, "json")


# -- reach ---------------------------------------------------------------------------------
def _reach_options(p) -> None:
    p.add_argument("peer", metavar="PEER", help="the address to reach (a pod on another node)")
    p.add_argument("--ifname", metavar="IF", help="only this rail (default: every interface "
                                                  "but lo and the pod's default NIC)")
    p.add_argument("--attempts", type=int, default=3, help="echoes per path at most (default 3)")
    p.add_argument("--timeout", default="1s", help="wait for each echo's reply (Go duration, 1s)")


def _reach(args) -> int:
    import ipaddress
    from cniplugin.cli import live as _live
    from cniplugin.cli import reach as _reach_paths
    from cniplugin.cli import render as _render
    from cniplugin.cli.common import pod_default_nic
    from cniplugin.protocol.config import parse_go_duration
    from cniplugin.protocol.errors import InterfaceNotFound
    try:
        peer = str(ipaddress.ip_address(args.peer))
        timeout = parse_go_duration(args.timeout)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.attempts < 1 or timeout <= 0:
        raise UsageError("--attempts must be at least 1 and --timeout positive")
    path = _live.resolve_netns(args.netns)
    pod_fd = _live.open_netns(path)
    try:
        result = _reach_paths.reach(pod_fd, path, peer, default_nic=pod_default_nic(args),
                                    ifname=args.ifname or "", attempts=args.attempts,
                                    timeout=timeout)
    except InterfaceNotFound as err:
        raise UsageError(err.msg) from None
    finally:
        close(pod_fd)
    emit(args, _render.reach_json(result),
         _render.reach_text(result, args.attempts, args.timeout))
    return EXIT_OK if result.ok else EXIT_PROBLEM


cmd_reach = subcommand(
    "reach", "The cross-node check at the routing level, from inside the pod: per rail, the "
             "interface, source and next hop the kernel picks for PEER from that rail's address "
             "(route get, through the pod's policy rules), and unbound; then an ICMP echo over "
             "each path. A path is good when PEER answers and the reply arrives on the "
             "interface the request left by. Exit 1 if a path has no route or no such answer. "
             "Needs root.",
    _reach, _reach_options, "netns", "pod-default-nic", "json")
