"""``cni-route-tune``: the operator's CLI (``--version``, ``--help`` and a table of subcommands).

Adding a subcommand = one ``main(argv) -> int`` function + one ``SUBCOMMANDS`` entry here. The
target is imported (and its heavy imports made) only when that subcommand runs, so
``--version`` and ``--help`` stay as cheap as an interpreter start; each subcommand parses its
own arguments. The read commands (show, facts, plan, verify, explain, orphans) read through
``_inspect`` and print through ``_render``; planning and checking are the engine's own
(``_engine.plan_for`` / ``_engine.diff``), never a second implementation.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

__all__ = ["main", "SUBCOMMANDS", "EXIT_OK", "EXIT_PROBLEM", "EXIT_USAGE", "EXIT_NOT_FOUND"]

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_NOT_FOUND = 0, 1, 2, 3
EXIT_CODES = """exit codes (read commands):
  0  ok: nothing wrong found
  1  a problem was found: drift, a routing problem, a failed probe, the walk and the kernel
     disagree, orphans present (or the command failed on this host, e.g. not root)
  2  usage error: bad options, or an input file that is missing, unreadable or invalid
  3  the network namespace (or pod) does not exist"""

#: name -> ("module:function", one-line help). The function takes argv (list[str]) and
#: returns an exit status.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("cniplugin.lab.demo:main",
             "build a throwaway multi-NIC pod in network namespaces and run the plugin chain"),
    "install": ("cniplugin.cli.install:main",
                "install or upgrade the plugin into a CNI bin dir (atomic, idempotent)"),
    "serve": ("cniplugin.transport.server:main", "run the resident engine (unix socket)"),
    "show": ("cniplugin.cli.main:cmd_show",
             "a pod's policy routing per interface: owned/foreign, problems (--node: node side)"),
    "facts": ("cniplugin.cli.main:cmd_facts", "dump the planner's facts of a pod as JSON (for plan)"),
    "plan": ("cniplugin.cli.main:cmd_plan",
             "what ADD would install, as ip commands (no root, no namespace entered)"),
    "verify": ("cniplugin.cli.main:cmd_verify", "CHECK an attachment against the kernel, as a diff"),
    "explain": ("cniplugin.cli.main:cmd_explain",
                "which rule, table, route and interface a packet takes, checked by the kernel"),
    "replay": ("cniplugin.cli.main:cmd_replay",
               "run a captured request (env + stdin) as a runtime would"),
    "probe": ("cniplugin.cli.main:cmd_probe", "the gateway and IP-conflict checks, by hand"),
    "orphans": ("cniplugin.cli.main:cmd_orphans",
                "route-tune node entries and state files nobody owns any more (--remove)"),
}


def _parser() -> argparse.ArgumentParser:
    from cniplugin._version import PLUGIN_NAME, SUPPORTED_VERSIONS, __version__
    listing = "\n".join(f"  {name:<10} {text}" for name, (_, text) in sorted(SUBCOMMANDS.items()))
    parser = argparse.ArgumentParser(
        prog="cni-route-tune",
        description="Inspect, explain and exercise route-tune, the policy-routing CNI plugin.",
        epilog=f"subcommands:\n{listing}\n\n{EXIT_CODES}\n\n"
               f"'cni-route-tune <subcommand> --help' shows its options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--version", action="version",
        version=f"{PLUGIN_NAME} {__version__} (CNI {', '.join(SUPPORTED_VERSIONS)})")
    parser.add_argument("subcommand", choices=sorted(SUBCOMMANDS), metavar="subcommand",
                        help="one of: " + ", ".join(sorted(SUBCOMMANDS)))
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _load(target: str):
    module_name, _, function = target.partition(":")
    return getattr(importlib.import_module(module_name), function)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cni-route-tune``; returns (and exits with) the subcommand's status."""
    options = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    target, _ = SUBCOMMANDS[options.subcommand]
    try:
        function = _load(target)
    except ModuleNotFoundError as exc:
        if exc.name and target.startswith(exc.name):
            sys.stderr.write(f"cni-route-tune: subcommand {options.subcommand!r} is not "
                             f"available in this build ({exc.name} is missing)\n")
            return 2
        raise
    try:
        status = function(options.args)
    except BrokenPipeError:  # `cni-route-tune show ... | head`: the reader is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PROBLEM
    return int(status or 0)


# -- shared plumbing -----------------------------------------------------------------------
class UsageError(Exception):
    """Bad options or input files (exit 2)."""


def _command(name: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"cni-route-tune {name}", description=description,
                                   epilog=EXIT_CODES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_node_netns(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node-netns", metavar="PATH",
                   help="the node's netns (default: the netns this command runs in)")


def _add_state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", metavar="DIR",
                   help="route-tune state dir (default: stateDir of the node defaults file "
                        "$ROUTE_TUNE_DEFAULTS or /etc/cni/route-tune/defaults.json, else "
                        "/run/route-tune)")


def _guarded(name: str, run, argv: list[str], build) -> int:
    """Parse ``argv`` with ``build()``, run, and map failures to the documented exit codes."""
    args = build().parse_args(argv)
    try:
        return run(args)
    except UsageError as err:
        code, text = EXIT_USAGE, str(err)
    except PermissionError as err:
        code, text = EXIT_PROBLEM, f"{err} (this command needs root)"
    except Exception as err:
        from cniplugin.protocol.errors import CNIError
        inspect = sys.modules.get(f"{__package__}.live")  # only it raises NotFound
        if inspect is not None and isinstance(err, inspect.NotFound):
            code, text = EXIT_NOT_FOUND, str(err)
        elif isinstance(err, CNIError):
            code, text = EXIT_PROBLEM, err.msg + (f" ({err.details})" if err.details else "")
        else:
            raise
    sys.stdout.flush()
    sys.stderr.write(f"cni-route-tune {name}: {text}\n")
    return code


def _node_defaults(environ=None):
    from cniplugin.protocol.env import read_node_defaults
    try:
        return read_node_defaults(os.environ if environ is None else environ)
    except Exception as err:  # a broken defaults file must not hide the pod from the operator
        raise UsageError(str(getattr(err, "msg", err))) from None


def _state_dir(args) -> str:
    return args.state_dir or _node_defaults().values.get("stateDir") or "/run/route-tune"


def _open_node(args):
    """The node netns fd (None: this process's netns)."""
    from cniplugin.cli.live import open_netns
    return open_netns(args.node_netns) if getattr(args, "node_netns", None) else None


def _close(*fds) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


def _emit(args, data: dict, text: str) -> None:
    from cniplugin.cli.render import dump_json
    print(dump_json(data) if args.json else text)


def _read_json(path: str, what: str):
    import json
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except OSError as err:
        raise UsageError(f"{what} {path}: {err.strerror}") from None
    except ValueError as err:
        raise UsageError(f"{what} {path} is not valid JSON: {err}") from None


def read_env_file(path: str) -> dict[str, str]:
    """``K=V`` lines (``#`` comments, ``export``, quotes), a NUL-separated ``/proc/<pid>/environ``
    dump, or a JSON object."""
    import json
    import shlex
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise UsageError(f"env file {path}: {err.strerror}") from None
    text = data.decode(errors="replace")
    if text.lstrip().startswith("{"):
        try:
            return {str(k): str(v) for k, v in json.loads(text).items()}
        except (ValueError, AttributeError) as err:
            raise UsageError(f"env file {path} is not a valid JSON object: {err}") from None
    lines = text.split("\0") if "\0" in text else text.splitlines()
    env = {}
    for number, line in enumerate(lines, 1):
        line = line.strip() if "\0" not in text else line
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ")
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise UsageError(f"env file {path}:{number}: expected KEY=VALUE, got {line!r}")
        if value[:1] in "'\"" and "\0" not in text:
            try:
                value = shlex.split(value)[0] if value.strip("'\"") else ""
            except ValueError:
                pass
        env[key.strip()] = value
    return env


# -- show / facts --------------------------------------------------------------------------
def _show_parser() -> argparse.ArgumentParser:
    p = _command("show", "A pod's policy routing, grouped per interface: addresses, the rules "
                         "selecting the interface's table, the table's routes, main-table routes "
                         "and neighbours; each marked [route-tune] (protocol 231) or [foreign]; "
                         "then the problems found. Needs root.")
    p.add_argument("--netns", required=True, metavar="NAME|PATH",
                   help="a name under /run/netns, a path (/proc/PID/ns/net, /var/run/netns/X), "
                        "or a container id that has route-tune state")
    p.add_argument("--node", action="store_true",
                   help="add the node-side entries for this pod (run on the node, or give "
                        "--node-netns)")
    p.add_argument("--pod-default-nic", metavar="IF",
                   help="the cluster CNI's interface (default: podDefaultCniNic, else eth0)")
    _add_state_dir(p)
    _add_node_netns(p)
    _add_json(p)
    return p


def _pod_default_nic(args) -> str:
    return args.pod_default_nic or _node_defaults().values.get("podDefaultCniNic") or "eth0"


def _show(args) -> int:
    from cniplugin.cli import live as _inspect
    from cniplugin.cli import render as _render
    from cniplugin.engine.store import Store
    store = Store(_state_dir(args))
    path = _inspect.resolve_netns(args.netns, store)
    pod_fd = _inspect.open_netns(path)
    node_fd = None
    try:
        node_fd = _open_node(args)
        table = int(_node_defaults().values.get("hostRuleTable") or 500)
        view = _inspect.build_pod_view(path, pod_fd, store, node_fd, args.node, table,
                                       _pod_default_nic(args))
    finally:
        _close(pod_fd, node_fd)
    _emit(args, _render.show_json(view), _render.show_text(view))
    return EXIT_PROBLEM if view.problems else EXIT_OK


def cmd_show(argv: list[str]) -> int:
    return _guarded("show", _show, argv, _show_parser)


def _facts_parser() -> argparse.ArgumentParser:
    p = _command("facts", "Dump what the planner sees for a pod (the engine's own gather) as "
                          "JSON; save it for `plan --facts`. Node facts need the node netns "
                          "(run on the node, or give --node-netns). Needs root.")
    p.add_argument("--netns", required=True, metavar="NAME|PATH")
    p.add_argument("--pod-default-nic", metavar="IF")
    _add_node_netns(p)
    _add_json(p)  # accepted for symmetry: the output is always JSON
    return p


def _facts(args) -> int:
    from cniplugin.cli import live as _inspect
    from cniplugin.cli import render as _render
    path = _inspect.resolve_netns(args.netns)
    pod_fd = _inspect.open_netns(path)
    node_fd = None
    try:
        node_fd = _open_node(args)
        facts = _inspect.gather_facts(pod_fd, node_fd, _pod_default_nic(args))
    finally:
        _close(pod_fd, node_fd)
    print(_render.dump_json(facts.to_dict()))
    return EXIT_OK


def cmd_facts(argv: list[str]) -> int:
    return _guarded("facts", _facts, argv, _facts_parser)


# -- plan / verify: a request from saved files -------------------------------------------
def _route_tune_entries(data, origin: str) -> list[tuple[dict, str]]:
    """(raw plugin config with name/cniVersion injected, origin) for each route-tune entry."""
    import base64
    import json
    if not isinstance(data, dict):
        return []
    if data.get("kind") == "cniCacheV1":  # libcni's result cache: config + final result
        try:
            conf = json.loads(base64.b64decode(data.get("config", "")))
        except ValueError:
            return []
        entries = _route_tune_entries(conf, origin)
        return [({**raw, "prevResult": raw.get("prevResult", data.get("result"))}, o)
                for raw, o in entries]
    if isinstance(data.get("plugins"), list):
        return [({**plugin, "name": data.get("name"), "cniVersion": data.get("cniVersion")},
                 origin) for plugin in data["plugins"]
                if isinstance(plugin, dict) and plugin.get("type") == "route-tune"]
    return [(data, origin)] if data.get("type") == "route-tune" else []


def load_route_tune_config(path: str, network: str | None) -> dict:
    """The route-tune entry of a conflist, plugin config, libcni cache file, or a directory of
    them (``/etc/cni/net.d``); ``network`` picks one when there are several."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path)
                       if n.endswith((".conflist", ".conf", ".json")))
    else:
        files = [path]
    entries = []
    for file in files:
        entries += _route_tune_entries(_read_json(file, "config"), file)
    if network is not None:
        entries = [e for e in entries if e[0].get("name") == network]
    if not entries:
        raise UsageError(f"no route-tune entry in {path}"
                         + (f" for network {network!r}" if network else ""))
    if len(entries) > 1:
        names = ", ".join(sorted({str(raw.get("name")) for raw, _ in entries}))
        raise UsageError(f"{path} has {len(entries)} route-tune entries ({names}): pick one "
                         f"with --network NAME")
    return dict(entries[0][0])


def _prev_result_from(path: str):
    data = _read_json(path, "prevResult")
    if isinstance(data, dict) and data.get("kind") == "cniCacheV1":
        return data.get("result")
    if isinstance(data, dict) and "prevResult" in data:
        return data["prevResult"]
    return data


def _guess_ifname(prev: dict | None) -> str:
    names = [i.get("name") for i in (prev or {}).get("interfaces", [])
             if isinstance(i, dict) and i.get("sandbox")]
    return names[0] if len(names) == 1 else ""


def _add_request_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE",
                   help="a conflist, a route-tune plugin config (a captured stdin), a libcni "
                        "cache file, or a directory such as /etc/cni/net.d")
    p.add_argument("--network", metavar="NAME", help="which network, when FILE has several")
    p.add_argument("--prev-result", metavar="FILE",
                   help="prevResult JSON (a result, a captured stdin or a libcni cache file); "
                        "default: the config's own prevResult")
    p.add_argument("--env", metavar="FILE",
                   help="K=V lines: CNI_IFNAME, CNI_CONTAINERID, CNI_NETNS, CNI_ARGS, "
                        "ROUTE_TUNE_DEFAULTS ...")
    p.add_argument("--ifname", help="CNI_IFNAME (default: the env file's, else the one "
                                    "interface of prevResult)")
    p.add_argument("--container-id", help="CNI_CONTAINERID (default: the env file's)")
    p.add_argument("--defaults", metavar="FILE", help="node defaults file (default: "
                   "ROUTE_TUNE_DEFAULTS of the env file or environment)")


def build_request(args, command: str, netns: str = "", need_ifname: bool = True):
    """A ``_protocol.Request`` from saved files, as the runtime would have sent it.

    Without ``need_ifname`` a missing interface name becomes the placeholder ``-`` (verify
    then finds the attachment by network name)."""
    from cniplugin.protocol.errors import CNIError
    from cniplugin.protocol.dispatch import Request, negotiate
    raw = load_route_tune_config(args.config, args.network)
    if args.prev_result:
        raw["prevResult"] = _prev_result_from(args.prev_result)
    env = read_env_file(args.env) if args.env else {}
    environ = dict(os.environ)
    environ.update({k: v for k, v in env.items() if k == "ROUTE_TUNE_DEFAULTS"})
    if args.defaults:
        environ["ROUTE_TUNE_DEFAULTS"] = args.defaults
    ifname = args.ifname or env.get("CNI_IFNAME") or _guess_ifname(raw.get("prevResult"))
    given_id = args.container_id or env.get("CNI_CONTAINERID") or ""
    container_id = given_id or "cni-route-tune"
    if not ifname and not need_ifname:
        ifname = "-"
    if not ifname:
        raise UsageError("which interface? give --ifname or CNI_IFNAME in --env (prevResult "
                         "does not name exactly one pod interface)")
    cni = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_IFNAME": ifname,
           "CNI_NETNS": netns or env.get("CNI_NETNS") or "/dev/null",
           "CNI_PATH": env.get("CNI_PATH") or "/opt/cni/bin", "CNI_ARGS": env.get("CNI_ARGS", "")}
    try:
        from cniplugin.protocol.env import parse_env
        req = Request(command, parse_env(cni), raw, negotiate(raw), _node_defaults(environ))
        req.config  # validate now: a bad config is a usage error, not drift
        req.prev_result
    except CNIError as err:
        raise UsageError(f"{args.config}: {err.msg}" + (f" ({err.details})" if err.details
                                                        else "")) from None
    # What the operator named (verify narrows the pod's attachments by these).
    req.cli_ifname = "" if ifname == "-" else ifname
    req.cli_container_id = given_id
    return req


def minimal_facts(req):
    """Facts derived from prevResult alone, when no ``--facts`` snapshot is given.

    Assumed: the pod has ``podDefaultCniNic`` (a veth, addresses unknown) and netK with
    prevResult's addresses and MAC; netK's main table holds the kernel's connected routes and
    prevResult's routes via netK (as IPAM installs them); no rules or tables besides main and
    local; no node facts. So the plan has no table 100, no cluster routes and no node side.
    """
    import ipaddress
    from cniplugin.engine.facts import Addr, Facts, Link, PodFacts
    from cniplugin.engine.objects import Route
    from cniplugin.engine.planner import attachment_from_result
    ifname, eth0 = req.env.ifname, req.config.pod_default_cni_nic
    prev = req.prev_result
    mac = next((i.mac for i in prev.interfaces if i.name == ifname and i.mac), "")
    links = (Link(2, eth0, "veth"), Link(3, ifname, "", mac or ""))
    att = attachment_from_result(prev, ifname, req.env.container_id, "", PodFacts())
    addrs, routes = [], []
    for cidr in att.addresses:
        iface = ipaddress.ip_interface(cidr)
        v = iface.version
        addrs.append(Addr(ifname, v, str(iface.ip), iface.network.prefixlen))
        routes.append(Route(v, 254, str(iface.network), ifname, scope="link" if v == 4 else
                            "universe", src=str(iface.ip) if v == 4 else "",
                            metric=0 if v == 4 else 256, proto=2))
    networks = [ipaddress.ip_interface(a).network for a in att.addresses]
    for route in prev.routes or []:
        dst = ipaddress.ip_network(str(route.dst), strict=False)
        gw = str(route.gw) if route.gw else ""
        if gw and any(ipaddress.ip_address(gw) in n for n in networks):
            routes.append(Route(dst.version, 254, str(dst), ifname, gateway=gw,
                                metric=0 if dst.version == 4 else 1024, proto=3))
    pod = PodFacts(links=links, addrs=tuple(addrs), main_routes=tuple(routes),
                   used_tables=frozenset({254, 255}))
    return Facts(pod=pod, warnings=("facts derived from prevResult alone: no "
                                    f"{eth0} address and no node facts were known",))


def _plan_parser() -> argparse.ArgumentParser:
    p = _command("plan", "Print what ADD would install for a saved config + prevResult, as the "
                         "ip commands of the plan. Changes nothing, needs no root and enters no "
                         "namespace: the observed facts come from --facts (saved by `cni-route-"
                         "tune facts`) or, without it, are derived from prevResult alone (no "
                         "eth0 address, no node: no table 100, cluster routes or node side).")
    _add_request_options(p)
    p.add_argument("--facts", metavar="FILE",
                   help="facts JSON saved by `cni-route-tune facts` (or `show --json`)")
    _add_json(p)
    return p


def _plan(args) -> int:
    req = build_request(args, "ADD")
    if req.prev_result is None:
        raise UsageError("plan needs a prevResult: --prev-result FILE, or a config that holds one")
    from cniplugin.engine import commands as _engine
    from cniplugin.cli import render as _render
    from cniplugin.protocol.errors import IOFailure
    from cniplugin.engine.facts import Facts
    from cniplugin.engine.planner import resolve_mode
    if args.facts:
        data = _read_json(args.facts, "facts")
        if isinstance(data, dict) and isinstance(data.get("facts"), dict):
            data = data["facts"]  # a saved `show --json`
        try:
            facts, source = Facts.from_dict(data), args.facts
        except (KeyError, TypeError, ValueError) as err:
            raise UsageError(f"facts {args.facts}: not a facts dump ({err})") from None
    else:
        facts, source = minimal_facts(req), "derived from prevResult alone"
    header = [f"plan: ADD of {req.env.ifname} for network {req.raw.get('name')} (container "
              f"{req.env.container_id})", f"facts: {source}"]
    if resolve_mode(req.config, req.env.ifname) == "disabled":
        _emit(args, {"mode": "disabled", "lines": []},
              "\n".join(f"# {h}" for h in header) + "\n# mode disabled: ADD passes prevResult "
              "through and installs nothing")
        return EXIT_OK
    try:
        desired = _engine.plan_for(req, facts)
    except IOFailure as err:  # the state dir is root's: plan as a first ADD
        header.append(f"state not readable ({err.msg}): planned as a first ADD")
        req.__dict__["config"] = req.config.model_copy(update={"state_dir": "/nonexistent"})
        desired = _engine.plan_for(req, facts)
    data = {"network": req.raw.get("name"), "ifname": req.env.ifname,
            "container_id": req.env.container_id, "facts": source,
            "lines": desired.render_lines(), "warnings": list(desired.warnings),
            "desired": desired.to_dict()}
    _emit(args, data, _render.plan_text(desired, header))
    return EXIT_OK


def cmd_plan(argv: list[str]) -> int:
    return _guarded("plan", _plan, argv, _plan_parser)


def _verify_parser() -> argparse.ArgumentParser:
    p = _command("verify", "Run the CHECK engine (the attachment's recorded objects vs the "
                           "kernel) and print the differences as a diff; exit 1 on drift. The "
                           "attachment is found by --ifname/--container-id (or the env file), "
                           "else by the config's network name among the pod's state files.")
    _add_request_options(p)
    p.add_argument("--netns", required=True, metavar="NAME|PATH")
    _add_state_dir(p)
    _add_node_netns(p)
    _add_json(p)
    return p


def _find_attachment(store, pod_inode: int, network: str, ifname: str, container_id: str):
    """The pod's state for ``network`` (narrowed by ifname / container id when known)."""
    from cniplugin.cli import live as _inspect
    found = [s for s in _inspect.states_of_pod(store, pod_inode) if s.network == network
             and ifname in ("", s.ifname) and container_id in ("", s.container_id)]
    if len(found) > 1:
        raise UsageError(f"network {network} has {len(found)} attachments in this pod "
                         f"({', '.join(s.ifname for s in found)}): pick one with --ifname")
    return found[0] if found else None


def _verify(args) -> int:
    from cniplugin.cli import live as _inspect
    from cniplugin.cli import render as _render
    from cniplugin.engine.store import Store
    req = build_request(args, "CHECK", need_ifname=False)
    store = Store(args.state_dir or req.config.state_dir)
    path = _inspect.resolve_netns(args.netns, store)
    pod_fd = _inspect.open_netns(path)
    node_fd = None
    try:
        node_fd = _open_node(args)
        pod_inode = os.fstat(pod_fd).st_ino
        network = str(req.raw.get("name"))
        state = _find_attachment(store, pod_inode, network, req.cli_ifname, req.cli_container_id)
        if state is None:
            sys.stderr.write(f"cni-route-tune verify: no route-tune state for network "
                             f"{network} in {path} (state dir {os.path.dirname(store.root)}): "
                             f"was ADD run for it?\n")
            return EXIT_PROBLEM
        drifts = _inspect.state_drift(state, pod_fd, node_fd)
        node_inode = _inspect.netns_inode(node_fd)
    finally:
        _close(pod_fd, node_fd)
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
    _emit(args, data, _render.verify_text(who, drifts, checked, notes))
    return EXIT_PROBLEM if drifts else EXIT_OK


def cmd_verify(argv: list[str]) -> int:
    return _guarded("verify", _verify, argv, _verify_parser)


# -- explain -------------------------------------------------------------------------------
def _explain_parser() -> argparse.ArgumentParser:
    p = _command("explain", "Walk the pod's rules in priority order (from/to/iif/fwmark, "
                            "lookup/goto/nop/unreachable/prohibit/blackhole, "
                            "suppress_prefixlength, "
                            "throw routes) and say which rule, table, route and interface a "
                            "packet to DST takes, and why; the kernel's own answer (route get "
                            "with RTM_F_LOOKUP_TABLE) is printed beside it and compared. "
                            "Exit 1 if they disagree. Needs root.")
    p.add_argument("dst", metavar="DST", help="destination address")
    p.add_argument("--from", dest="src", metavar="SRC", help="source address")
    p.add_argument("--iif", metavar="IF", help="input interface (an arriving packet)")
    p.add_argument("--mark", type=lambda s: int(s, 0), default=0, metavar="N",
                   help="firewall mark (fwmark rules)")
    p.add_argument("--netns", required=True, metavar="NAME|PATH")
    _add_json(p)
    return p


def _explain(args) -> int:
    import ipaddress
    try:
        family = ipaddress.ip_address(args.dst).version
        if args.src and ipaddress.ip_address(args.src).version != family:
            raise UsageError(f"--from {args.src} and {args.dst} are of different families")
    except ValueError as err:
        raise UsageError(str(err)) from None
    from cniplugin.cli import explain as _explain
    from cniplugin.cli import live as _inspect
    from cniplugin.cli import render as _render
    from cniplugin.protocol.errors import InterfaceNotFound
    path = _inspect.resolve_netns(args.netns)
    pod_fd = _inspect.open_netns(path)
    try:
        flow = _explain.Flow(family, str(ipaddress.ip_address(args.dst)),
                             str(ipaddress.ip_address(args.src)) if args.src else "",
                             args.iif or "", args.mark)
        result = _explain.explain(pod_fd, flow)
    except InterfaceNotFound as err:
        raise UsageError(err.msg) from None
    finally:
        _close(pod_fd)
    _emit(args, _render.explain_json(path, result), _render.explain_text(path, result))
    return EXIT_OK if result.agree else EXIT_PROBLEM


def cmd_explain(argv: list[str]) -> int:
    return _guarded("explain", _explain, argv, _explain_parser)


# -- replay --------------------------------------------------------------------------------
def _replay_parser() -> argparse.ArgumentParser:
    p = _command("replay", "Run a captured request exactly as the runtime would: the installed "
                           "route-tune executable, with the env file as its whole environment "
                           "(PATH added when absent) and the stdin file on stdin. Prints stdout, "
                           "stderr and the exit code; exits 0 if the plugin did, else 1.")
    p.add_argument("--env", required=True, metavar="FILE",
                   help="K=V lines, /proc/PID/environ dump or JSON object")
    p.add_argument("--stdin", required=True, metavar="FILE", help="the request's stdin bytes")
    p.add_argument("--netns-override", metavar="PATH", help="replace CNI_NETNS")
    p.add_argument("--plugin", metavar="PATH",
                   help="the executable (default: route-tune next to this interpreter, else "
                        "on PATH)")
    p.add_argument("--node-netns", metavar="PATH",
                   help="run the plugin in this netns (the runtime's; default: this one)")
    _add_json(p)
    return p


def _find_plugin(explicit: str | None) -> str:
    import shutil
    candidates = [explicit] if explicit else [
        os.path.join(os.path.dirname(sys.executable), "route-tune"), shutil.which("route-tune")]
    for cand in candidates:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return os.path.abspath(cand)
    raise UsageError("no route-tune executable found" + (f" at {explicit}" if explicit else ""))


def _replay(args) -> int:
    import shlex
    import subprocess
    env = read_env_file(args.env)
    try:
        with open(args.stdin, "rb") as f:
            stdin = f.read()
    except OSError as err:
        raise UsageError(f"stdin file {args.stdin}: {err.strerror}") from None
    if args.netns_override:
        env["CNI_NETNS"] = args.netns_override
    env.setdefault("PATH", os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))
    plugin = _find_plugin(args.plugin)
    from cniplugin.kernel import netns as _netns
    node_fd = _open_node(args)
    try:
        with _netns.entered(node_fd):  # the child forks from this thread: it starts there too
            proc = subprocess.run([plugin], input=stdin, env=env, capture_output=True,
                                  check=False)
    finally:
        _close(node_fd)
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    cni = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()) if k.startswith("CNI_"))
    data = {"plugin": plugin, "env": env, "exit_code": proc.returncode, "stdout": out,
            "stderr": err}
    text = (f"$ {cni} {plugin} < {args.stdin}\nexit code: {proc.returncode}\n"
            f"--- stdout ---\n{out.rstrip()}\n--- stderr ---\n{err.rstrip()}")
    _emit(args, data, text)
    return EXIT_OK if proc.returncode == 0 else EXIT_PROBLEM


def cmd_replay(argv: list[str]) -> int:
    return _guarded("replay", _replay, argv, _replay_parser)


# -- probe ---------------------------------------------------------------------------------
def _probe_parser() -> argparse.ArgumentParser:
    p = _command("probe", "The gateway and IP-conflict checks by hand, inside the pod: ARP/NDP "
                          "from IF's addresses. Without --gateway or --conflict both run (the "
                          "gateway taken from IF's default routes); the conflict check runs "
                          "first and a conflict skips the gateway probe (#4475). Needs root.")
    p.add_argument("--netns", required=True, metavar="NAME|PATH")
    p.add_argument("--ifname", required=True, metavar="IF")
    p.add_argument("--gateway", action="append", metavar="GW",
                   help="gateway to probe (repeatable; 'auto' = IF's default-route gateways)")
    p.add_argument("--conflict", action="store_true", help="probe IF's addresses for conflicts")
    p.add_argument("--retries", type=int, default=3, help="probes per address (default 3)")
    p.add_argument("--interval", default="10ms", help="between probes (Go duration, 10ms)")
    p.add_argument("--timeout", default="100ms", help="wait after the last probe (100ms)")
    _add_json(p)
    return p


def _probe(args) -> int:
    from cniplugin.cli import live as _inspect
    from cniplugin.kernel import netns as _netns
    from cniplugin.kernel import probe
    from cniplugin.protocol.config import parse_go_duration
    from cniplugin.protocol.errors import CNIError
    try:
        opts = probe.ProbeOptions(args.retries, parse_go_duration(args.interval),
                                  parse_go_duration(args.timeout))
    except ValueError as err:
        raise UsageError(str(err)) from None
    path = _inspect.resolve_netns(args.netns)
    pod_fd = _inspect.open_netns(path)
    try:
        snap = _inspect.snapshot(pod_fd)
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
        _close(pod_fd)
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
    _emit(args, data, "\n".join(lines))
    failed = any(res["ok"] is False for res in results.values())
    return EXIT_PROBLEM if failed or not results else EXIT_OK


def cmd_probe(argv: list[str]) -> int:
    return _guarded("probe", _probe, argv, _probe_parser)


# -- orphans -------------------------------------------------------------------------------
def _orphans_parser() -> argparse.ArgumentParser:
    p = _command("orphans", "Recover a node by hand: list route-tune's node entries (rules, "
                            "hostRuleTable routes and neighbours with protocol 231) that no "
                            "state file lists, and state files whose pod netns is gone. "
                            "--remove cleans them: stale states through the engine's DEL (node "
                            "side), then the unlisted entries under the node lock. Run it on "
                            "the node (or give --node-netns). Needs root.")
    p.add_argument("--remove", action="store_true", help="remove what was found")
    p.add_argument("--host-rule-table", type=int, action="append", metavar="T",
                   help="also look in this table (default: the node defaults' hostRuleTable, "
                        "500, and every table a route-tune node rule looks up)")
    _add_state_dir(p)
    _add_node_netns(p)
    _add_json(p)
    return p


def _orphans(args) -> int:
    from cniplugin.cli import live as _inspect
    from cniplugin.cli import render as _render
    from cniplugin.engine.store import Store
    store = Store(_state_dir(args))
    tables = set(args.host_rule_table or [int(_node_defaults().values.get("hostRuleTable")
                                               or 500)])
    node_fd = _open_node(args)
    try:
        found = _inspect.find_orphans(store, node_fd, tables)
        if args.remove:
            _inspect.remove_orphans(found, store, node_fd)
    finally:
        _close(node_fd)
    _emit(args, _render.orphans_json(found), _render.orphans_text(found, args.remove))
    if args.remove:
        return EXIT_PROBLEM if found.errors else EXIT_OK
    return EXIT_PROBLEM if found.objects or found.stale_states else EXIT_OK


def cmd_orphans(argv: list[str]) -> int:
    return _guarded("orphans", _orphans, argv, _orphans_parser)


if __name__ == "__main__":
    sys.exit(main())
