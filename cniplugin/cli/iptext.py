"""Live kernel objects (``records.objects`` Rule/Route/Neighbour) as ``ip`` prints them, and as JSON.

``render()`` on an object is the command that installs it; ``text()`` here is what ``ip rule`` /
``ip route`` / ``ip neigh`` show for it, with every live-only field (actions, selectors, route
types, multipath legs), so an operator can compare a line with ``ip``'s own output.
"""

from __future__ import annotations

import ipaddress

from cniplugin._version import RTPROT_ROUTE_TUNE
from cniplugin.records.objects import PROTO_NAMES, Neighbour, Route, Rule, table_name


def owner_of(proto: int) -> str:
    """``route-tune`` for protocol 231, else ``foreign``."""
    return "route-tune" if proto == RTPROT_ROUTE_TUNE else "foreign"


def short(prefix: str) -> str:
    """``1.2.3.4/32`` -> ``1.2.3.4`` (as ip prints host prefixes)."""
    net = ipaddress.ip_network(prefix, strict=False)
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def text(obj: Rule | Route | Neighbour) -> str:
    if isinstance(obj, Rule):
        return _rule_text(obj)
    if isinstance(obj, Route):
        return _route_text(obj)
    return _neigh_text(obj)


def _rule_text(rule: Rule) -> str:
    """As ``ip rule show`` prints it."""
    words = [f"{rule.priority}:", "not" if rule.invert else "",
             f"from {short(rule.src) if rule.src else 'all'}"]
    words += [f"to {short(rule.dst)}"] if rule.dst else []
    if rule.fwmark or rule.fwmask:
        words.append(f"fwmark {rule.fwmark:#x}" + (
            f"/{rule.fwmask:#x}" if rule.fwmask != 0xFFFFFFFF else ""))
    words += [f"iif {rule.iif}"] if rule.iif else []
    words += [f"oif {rule.oif}"] if rule.oif else []
    words += list(rule.other)
    if rule.action == "lookup":
        words.append(f"lookup {table_name(rule.table)}")
        if rule.suppress_prefixlen is not None:
            words.append(f"suppress_prefixlength {rule.suppress_prefixlen}")
    elif rule.action == "goto":
        words.append(f"goto {rule.goto}" + (" [unresolved]" if rule.unresolved else ""))
    else:
        words.append(rule.action)
    if rule.proto and rule.proto != 2:  # iproute2 hides "proto kernel" on rules too
        words.append(f"proto {PROTO_NAMES.get(rule.proto, rule.proto)}"
                     if rule.proto != RTPROT_ROUTE_TUNE else "proto 231")
    return " ".join(w for w in words if w)


def _route_text(route: Route) -> str:
    """As ``ip route show table X`` prints it (without the table)."""
    dst = "default" if route.prefixlen == 0 else short(route.dst)
    words = [] if route.type == "unicast" else [route.type]
    words.append(dst)
    if route.nexthops:
        words += ["nexthop" + (f" via {gw}" if gw else "") + f" dev {dev}"
                  for dev, gw in route.nexthops]
    else:
        words += [f"via {route.gateway}"] if route.gateway else []
        words += [f"dev {route.dev}"] if route.dev else []
    if route.proto not in (0, 3):  # iproute2 hides "proto boot"
        name = route.proto if route.owned else PROTO_NAMES.get(route.proto, route.proto)
        words.append(f"proto {name}")
    if route.scope != "universe":
        words.append(f"scope {route.scope}")
    words += [f"src {route.src}"] if route.src else []
    words += [f"metric {route.metric}"] if route.metric else []
    words += ["dead"] if route.dead else []
    return " ".join(words)


def _neigh_text(neigh: Neighbour) -> str:
    words = [neigh.ip, f"dev {neigh.dev}", f"lladdr {neigh.lladdr}" if neigh.lladdr else "",
             "PERMANENT" if neigh.permanent else "",
             f"proto {neigh.proto}" if neigh.proto else ""]
    return " ".join(w for w in words if w)


# The JSON form's keys, in the order ``show/explain/orphans --json`` have always printed them.
_JSON_FIELDS = {
    Rule: ("family", "priority", "action", "table", "goto", "src", "dst", "iif", "oif",
           "fwmark", "fwmask", "invert", "unresolved", "suppress_prefixlen", "proto", "other"),
    Route: ("family", "table", "type", "dst", "dev", "gateway", "scope", "src", "metric",
            "proto", "nexthops", "dead"),
    Neighbour: ("family", "dev", "ip", "lladdr", "permanent", "proto"),
}


def to_json(obj: Rule | Route | Neighbour) -> dict:
    out = {}
    for name in _JSON_FIELDS[type(obj)]:
        value = getattr(obj, name)
        if name == "nexthops":
            value = [list(leg) for leg in value]
        elif name == "other":
            value = list(value)
        out[name] = value
    return {**out, "text": text(obj), "owner": owner_of(obj.proto)}
