"""Behaviour assertions shared by the end-to-end suites (route lookups and pings)."""

from __future__ import annotations

import json

from cniplugin.lab.runtime import RailPod
from cniplugin.lab.topology import OverlayLab


def external(fam: str) -> str:
    """A destination only a default route reaches."""
    return "192.0.2.1" if fam == "4" else "2001:db8::1"


def cluster_dests(lab: OverlayLab, fam: str) -> list[str]:
    """One address in each cluster CIDR of the node defaults, plus the node's own IP."""
    if fam == "4":
        return ["10.233.0.10", "10.233.64.7", "169.254.20.1", lab.node_ip("4")]
    return ["fd00:10:96::a", "fd00:10:233::7", lab.node_ip("6")]


def assert_rail_routing(pod: RailPod, rails: list[int] | None = None, default_nic: str = "eth0") -> None:
    """Outcomes 1-4 and 6 of issue 3 for `rails` (default: all), by `ip route get` and pings."""
    lab = pod.lab
    rails = list(pod.rails) if rails is None else rails
    problems: list[str] = []
    pairs: list[tuple[str, str]] = []
    for fam in lab.families:
        sources = [lab.pod_ip(fam)] + [lab.rail_ip(k, fam) for k in rails]
        for k in rails:
            src, gw = lab.rail_ip(k, fam), lab.gw_ip(k, fam)
            got = lab.route_get(lab.pod, lab.behind_ip(k, fam), src)
            if (got.get("dev"), got.get("gateway")) != (f"net{k}", gw):
                problems.append(f"from {src} to {lab.behind_ip(k, fam)}: want net{k} via {gw}, got {got}")
            got = lab.route_get(lab.pod, gw, src)
            if got.get("dev") != f"net{k}" or got.get("gateway"):
                problems.append(f"from {src} to {gw}: want direct on net{k}, got {got}")
            pairs += [(src, gw), (src, lab.behind_ip(k, fam))]
        for dst in cluster_dests(lab, fam):
            for src in sources + [None]:
                got = lab.route_get(lab.pod, dst, src)
                if got.get("dev") != "eth0":
                    problems.append(f"cluster {dst} from {src or 'no source'}: want eth0, got {got}")
        got = lab.route_get(lab.pod, external(fam))
        if got.get("dev") != default_nic:
            problems.append(f"default (no source) to {external(fam)}: want {default_nic}, got {got}")
        got = lab.route_get(lab.pod, external(fam), lab.pod_ip(fam))
        if got.get("dev") != "eth0":
            problems.append(f"reply from eth0 {lab.pod_ip(fam)}: want eth0 (table 100), got {got}")
    for ping in lab.ping_many(lab.pod, pairs):
        if not ping["ok"]:
            problems.append(f"pod ping {ping['src']} -> {ping['dst']}: {ping['error']}")
    node_pairs = [("", lab.rail_ip(k, fam)) for k in rails for fam in lab.families]
    for ping in lab.ping_many(lab.node, node_pairs):
        if not ping["ok"]:
            problems.append(f"node ping -> {ping['dst']}: {ping['error']}")
    assert not problems, "\n".join(problems)


def pod_rules(lab: OverlayLab) -> list[dict]:
    """The pod's non-default rules of both families (`ip -j rule`)."""
    rules = []
    for fam in lab.families:
        rules += [r for r in json.loads(lab.ip(lab.pod, "-j", f"-{fam}", "rule", "show"))
                  if r.get("table") not in ("local", "main", "default")]
    return rules
