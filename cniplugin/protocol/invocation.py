"""``Invocation``: the one input of every engine command, derived once from a CNI request.

The protocol layer (``protocol.dispatch``) builds it from env + stdin; the CLI builds it from
saved files. Everything the engine needs is resolved here or before: the engine never looks at
raw CNI variables, never re-derives a default and never duck-types a caller's object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import field
from typing import TYPE_CHECKING, Any

from cniplugin.protocol.errors import NotChained
from cniplugin.records.values import value

if TYPE_CHECKING:
    from cniplugin.protocol.config import PluginConfig
    from cniplugin.protocol.wire import Result

__all__ = ["Invocation", "require_chained"]


def require_chained(prev_result: object) -> None:
    """The must-be-chained check (ADD, and the CLI's ``plan``): route-tune tunes what a previous
    plugin attached, so it needs that plugin's result."""
    if prev_result is None:
        raise NotChained(
            "route-tune must be chained: it needs a prevResult",
            "put route-tune last in a conflist's plugins, after an interface plugin such as "
            "macvlan (with its IPAM)")


@value
class Invocation:
    """One engine command.

    - ``command``: ADD | DEL | CHECK | GC | STATUS
    - ``container_id``, ``ifname``, ``netns``: CNI_CONTAINERID, CNI_IFNAME, CNI_NETNS
    - ``network``: the config's ``name``; ``cni_version``: the negotiated reply version
    - ``state_dir``: where attachment state lives (from the config, or the node defaults file
      when there is no config)
    - ``config``: the validated ``PluginConfig``; None only for a DEL whose netns is gone (that
      DEL works from the state store alone, so it never imports pydantic)
    - ``prev_result``: canonical 1.x ``Result`` or None (required for ADD)
    - ``raw``: the stdin config (GC reads ``cni.dev/valid-attachments`` from it)
    - ``pod_netns_fd``: given by the resident server (SCM_RIGHTS); None = open ``netns``
    - ``node_netns_fd``: the caller's netns (the node); None = this process's netns
    """

    command: str
    container_id: str
    ifname: str
    netns: str
    network: str
    cni_version: str
    state_dir: str
    config: PluginConfig | None = None
    prev_result: Result | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)
    pod_netns_fd: int | None = None
    node_netns_fd: int | None = None

    def __post_init__(self) -> None:
        if self.command == "ADD":
            require_chained(self.prev_result)
        if self.config is None and self.command != "DEL":
            raise ValueError(f"{self.command} needs a validated config")
