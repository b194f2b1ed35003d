"""An engine ``Invocation`` from saved files (a conflist or captured stdin, a prevResult, an env
file), as the runtime would have sent it: the input of ``plan`` and ``verify``."""

from __future__ import annotations

import os

from cniplugin.cli.common import UsageError, node_defaults, read_env_file, read_json


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
        entries += _route_tune_entries(read_json(file, "config"), file)
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
    data = read_json(path, "prevResult")
    if isinstance(data, dict) and data.get("kind") == "cniCacheV1":
        return data.get("result")
    if isinstance(data, dict) and "prevResult" in data:
        return data["prevResult"]
    return data


def _guess_ifname(prev: dict | None) -> str:
    names = [i.get("name") for i in (prev or {}).get("interfaces", [])
             if isinstance(i, dict) and i.get("sandbox")]
    return names[0] if len(names) == 1 else ""


def request_options(p) -> None:
    """The options naming a request's saved files (``plan``, ``verify``)."""
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


class Named:
    """What the operator named (verify narrows the pod's attachments by these)."""

    def __init__(self, ifname: str, container_id: str) -> None:
        self.ifname, self.container_id = ifname, container_id


def build_invocation(args, command: str, need_ifname: bool = True):
    """(``Invocation``, ``Named``) from saved files, through the protocol layer's own constructor
    (every check a runtime's request gets).

    Without ``need_ifname`` a missing interface name becomes the placeholder ``-`` (verify
    then finds the attachment by network name)."""
    from cniplugin.protocol.errors import CNIError, NotChained
    from cniplugin.protocol.invocation import from_request
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
    if not ifname and not need_ifname:
        ifname = "-"
    if not ifname:
        raise UsageError("which interface? give --ifname or CNI_IFNAME in --env (prevResult "
                         "does not name exactly one pod interface)")
    cni = {"CNI_COMMAND": command, "CNI_CONTAINERID": given_id or "cni-route-tune",
           "CNI_IFNAME": ifname, "CNI_NETNS": env.get("CNI_NETNS") or "/dev/null",
           "CNI_PATH": env.get("CNI_PATH") or "/opt/cni/bin", "CNI_ARGS": env.get("CNI_ARGS", "")}
    environ.update(cni)
    try:
        # A bad config is a usage error here, not drift.
        inv = from_request(environ, raw, node_defaults(environ))
    except NotChained:
        raise UsageError("plan needs a prevResult: --prev-result FILE, or a config that holds "
                         "one") from None
    except CNIError as err:
        raise UsageError(f"{args.config}: {err.msg}" + (f" ({err.details})" if err.details
                                                        else "")) from None
    return inv, Named("" if ifname == "-" else ifname, given_id)
