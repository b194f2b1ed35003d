"""Planner test plumbing: a real ``PluginConfig`` from a config dict, and a plan as golden text."""

from __future__ import annotations

from cniplugin.engine import planner
from cniplugin.engine.attachment import Attachment
from cniplugin.engine.mode import resolve_mode
from cniplugin.records.facts import Facts
from cniplugin.records.objects import Desired, apply_order
from cniplugin.protocol.config import PluginConfig, build
from cniplugin.protocol.env import NodeDefaults
from harness.golden import assert_golden

#: The node defaults the planner tests run under (the lab's cluster CIDRs plus an IPv6 pod CIDR).
NODE_DEFAULTS = {"overlayPodCIDR": ["10.233.64.0/18", "fd00:64::/64"],
                 "serviceCIDR": ["10.233.0.0/18"], "hijackCIDR": ["169.254.0.0/16"]}


def config(**keys: object) -> PluginConfig:
    """The validated config for conflist ``keys`` (camelCase) on top of ``NODE_DEFAULTS``."""
    return build(keys, NodeDefaults("/etc/cni/route-tune/defaults.json", dict(NODE_DEFAULTS)))


def plan(config: PluginConfig, attachment: Attachment, facts: Facts,
         prior: Desired | None = None) -> Desired:
    """The planner with the mode the engine's gather resolves from these facts."""
    mode = resolve_mode(config, attachment.ifname, [link.name for link in facts.pod.links])
    return planner.plan(config, attachment, facts, prior, mode=mode)


def golden(desired: Desired) -> str:
    """The whole plan as text: header, then every side's objects rendered in installation order."""
    families = ",".join(str(f) for f in desired.families)
    lines = [f"{desired.mode} {desired.ifname} table {desired.table} families {families} "
             f"peer {desired.host_peer or '-'}"]
    for side in ("displaced", "pod_owned", "pod_shared", "node_owned", "node_shared"):
        objs = getattr(desired, side)
        lines.append(f"{side}:")
        lines += [f"  {obj.render()}" for obj in (objs if side == "displaced" else apply_order(objs))]
    lines += [f"warning: {w}" for w in desired.warnings]
    return "\n".join(lines) + "\n"


def assert_plan(desired: Desired, name: str) -> None:
    """``golden(desired)`` equals ``tests/unit/golden/<name>.plan`` (``UPDATE_GOLDEN=1`` rewrites it)."""
    assert_golden(golden(desired), f"{name}.plan")
