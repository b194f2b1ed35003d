"""``cni-route-tune explain``: which rule, table, route and interface a packet takes, and why.

The walk follows the kernel's policy routing (``fib_rules_lookup`` with ``fib4/fib6_rule_match``
and ``fib_table_lookup``): rules in priority order; selectors from/to/iif/oif/fwmark and ``not``;
actions lookup/goto/nop/unreachable/prohibit/blackhole; ``suppress_prefixlength``; throw,
blackhole, unreachable and prohibit routes; longest prefix, then lowest metric. The kernel's own
answer (``route get``, which reports the table it really used) is fetched beside it and compared,
so a gap in the walk shows up as a loud disagreement instead of a confident wrong answer.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from dataclasses import dataclass, field

from cniplugin.cli.iptext import short, text
from cniplugin.cli.live import Snapshot, snapshot
from cniplugin.records.objects import Route, Rule, table_name
from cniplugin.kernel import netlink as _netlink
from cniplugin.kernel.reads import RouteGet
from cniplugin.protocol.errors import InterfaceNotFound, RouteConflict


@dataclass
class Flow:
    family: int
    dst: str
    src: str = ""
    iif: str = ""
    mark: int = 0


@dataclass
class Step:
    rule: Rule
    verdict: str            # match | no match | skipped
    reason: str
    outcome: str = ""


@dataclass
class Explanation:
    flow: Flow
    steps: list[Step]
    table: int | None = None
    route: Route | None = None
    dev: str = ""
    devs: tuple[str, ...] = ()
    gateway: str = ""
    errno: int = 0          # the walk predicts this lookup error (0: a route was found)
    why: str = ""
    kernel: RouteGet | None = None
    kernel_error: str = ""
    agree: bool = False
    disagreement: str = ""
    notes: list[str] = field(default_factory=list)


def _in(addr: str, prefix: str) -> bool:
    return ipaddress.ip_address(addr) in ipaddress.ip_network(prefix, strict=False)


def _match(rule: Rule, flow: Flow) -> tuple[bool, str]:
    """Does ``rule`` select ``flow``? (fib_rule_match + fib4/fib6_rule_match), and why."""
    checks: list[tuple[bool, str]] = []
    if rule.src:
        ok = bool(flow.src) and _in(flow.src, rule.src)
        checks.append((ok, f"from {short(rule.src)}" + ("" if ok else
                       f" ≠ {flow.src or 'no source (unspecified)'}")))
    if rule.dst:
        ok = _in(flow.dst, rule.dst)
        checks.append((ok, f"to {short(rule.dst)}" + ("" if ok else f" ≠ {flow.dst}")))
    if rule.iif:
        # Locally generated traffic (no --iif) is looked up with iif = lo.
        iif = flow.iif or "lo"
        checks.append((rule.iif == iif, f"iif {rule.iif}" + ("" if rule.iif == iif else
                                                             f" ≠ {iif}")))
    if rule.oif:
        checks.append((False, f"oif {rule.oif} (route get names no output interface)"))
    if rule.fwmask:
        ok = not ((rule.fwmark ^ flow.mark) & rule.fwmask)
        checks.append((ok, f"fwmark {rule.fwmark:#x}/{rule.fwmask:#x}"
                       + ("" if ok else f" ≠ mark {flow.mark:#x}")))
    for other in rule.other:
        checks.append((False, f"{other} (a route lookup without ports/tos/protocol never "
                              f"matches it)"))
    if not checks:
        ok, reason = True, "from all"
    else:
        failed = [why for good, why in checks if not good]
        ok = not failed
        reason = ", ".join(failed) if failed else ", ".join(why for _, why in checks)
    if rule.invert:  # `not` negates the whole selector set
        return not ok, (f"selectors fail ({reason}), so `not` matches" if not ok
                        else f"selectors match ({reason}), so `not` does not")
    return ok, reason


def lookup(snap: Snapshot, table: int, flow: Flow) -> Route | None:
    """Longest-prefix match in one table, lowest metric first; dead routes skipped."""
    best: Route | None = None
    for route in snap.routes_in(table, flow.family):
        if route.dead or not _in(flow.dst, route.dst):
            continue
        if best is None or (route.prefixlen, -route.metric) > (
                best.prefixlen, -best.metric):
            best = route
    return best


# errno of a lookup that ends in a rule action or route type (fib_props / fib4_rule_action)
_RULE_ERRNO = {"unreachable": errno.ENETUNREACH, "prohibit": errno.EACCES,
               "blackhole": errno.EINVAL}
_ROUTE_ERRNO = {"unreachable": errno.EHOSTUNREACH, "prohibit": errno.EACCES,
                "blackhole": errno.EINVAL}


def walk(snap: Snapshot, flow: Flow) -> Explanation:
    """Walk the rule list as the kernel does, recording why each rule matched or not."""
    out = Explanation(flow, [])
    if flow.family == 4 and flow.src and not flow.iif and flow.src not in snap.local_ips():
        out.errno = errno.ENETUNREACH
        out.why = (f"source {flow.src} is not an address of this netns: the kernel refuses an "
                   f"output lookup from it before any rule is consulted")
        return out
    rules = snap.rules_of(flow.family)
    i, target = 0, None
    while i < len(rules):
        rule = rules[i]
        i += 1
        if target is not None and rule.priority < target:
            continue
        target = None
        matched, reason = _match(rule, flow)
        if not matched:
            out.steps.append(Step(rule, "no match", reason))
            continue
        step = Step(rule, "match", reason)
        out.steps.append(step)
        if rule.action == "nop":
            step.outcome = "nop: next rule"
        elif rule.action == "goto":
            if rule.unresolved or not any(r.priority == rule.goto for r in rules):
                step.outcome = f"goto {rule.goto}: no such rule, ignored"
                continue
            step.outcome = f"goto {rule.goto}"
            i = next(n for n, r in enumerate(rules) if r.priority == rule.goto)
        elif rule.action in _RULE_ERRNO:
            out.errno = _RULE_ERRNO[rule.action]
            step.outcome = f"{rule.action}: the lookup fails ({os.strerror(out.errno)})"
            out.why = f"rule {rule.priority} is an `{rule.action}` rule"
            return out
        elif rule.action == "lookup":
            route = lookup(snap, rule.table, flow)
            name = f"table {table_name(rule.table)}"
            if route is None:
                step.outcome = f"{name}: no route to {flow.dst}: next rule"
                continue
            if route.type == "throw":
                step.outcome = f"{name}: `{text(route)}` is a throw route: next rule"
                continue
            if rule.suppress_prefixlen is not None \
                    and route.prefixlen <= rule.suppress_prefixlen:
                step.outcome = (f"{name}: `{text(route)}` suppressed (prefix length "
                                f"{route.prefixlen} <= {rule.suppress_prefixlen}): "
                                f"next rule")
                continue
            step.outcome = f"{name}: {text(route)}"
            _answer(out, rule, route)
            return out
        else:
            step.outcome = f"unknown action {rule.action}: ignored"
    out.errno = errno.ENETUNREACH
    out.why = "no rule led to a route"
    return out


def _answer(out: Explanation, rule: Rule, route: Route) -> None:
    out.table, out.route = rule.table, route
    reason = f"rule {rule.priority} ({text(rule).split(': ', 1)[1]}) selected table " \
             f"{table_name(rule.table)}, whose longest match for {out.flow.dst} is {route.dst}"
    if route.type in _ROUTE_ERRNO:
        out.errno = _ROUTE_ERRNO[route.type]
        out.why = reason + f", a {route.type} route"
        return
    if route.type == "local":
        out.dev, out.devs = "lo", ("lo",)
    elif route.nexthops:
        out.devs = tuple(d for d, _ in route.nexthops)
        out.dev = out.devs[0]
    else:
        out.dev, out.devs, out.gateway = route.dev, (route.dev,), route.gateway
    out.why = reason


def explain(pod_fd: int, flow: Flow) -> Explanation:
    """The walk beside the kernel's own ``route get`` (RTM_F_LOOKUP_TABLE), compared."""
    snap = snapshot(pod_fd)
    if flow.iif and not any(link.name == flow.iif for link in snap.links):
        raise InterfaceNotFound(f"--iif {flow.iif}: no such interface in the netns")
    out = walk(snap, flow)
    with _netlink.Netlink.entered(pod_fd) as nl:
        try:
            out.kernel = nl.route_get(flow.dst, flow.src or None, flow.iif or None, flow.mark)
        except RouteConflict as err:
            out.kernel_error = err.msg
    _compare(out)
    return out


def _compare(out: Explanation) -> None:
    if out.errno:
        expected = os.strerror(out.errno)
        if out.kernel is not None:
            out.disagreement = (f"the walk predicts an error ({expected}) but the kernel "
                                f"routes it: table {table_name(out.kernel.table)} dev "
                                f"{out.kernel.dev}")
        elif expected not in out.kernel_error:
            out.disagreement = (f"both fail, but the walk predicts {expected!r} and the kernel "
                                f"says {out.kernel_error!r}")
    elif out.kernel is None:
        out.disagreement = (f"the walk found table {table_name(out.table or 0)} dev {out.dev} "
                            f"but the kernel says: {out.kernel_error}")
        if out.flow.iif:
            out.notes.append("an input lookup (--iif) also checks forwarding and reverse-path "
                             "filtering, which the walk does not model")
    else:
        k = out.kernel
        wrong = []
        if k.table != out.table:
            wrong.append(f"table {table_name(k.table)} (walk: {table_name(out.table or 0)})")
        if k.dev not in out.devs:
            wrong.append(f"dev {k.dev} (walk: {'|'.join(out.devs)})")
        if out.gateway and k.gateway != out.gateway:
            wrong.append(f"via {k.gateway or '-'} (walk: {out.gateway})")
        if wrong:
            out.disagreement = "the kernel chose " + ", ".join(wrong)
    out.agree = not out.disagreement
