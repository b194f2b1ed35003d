"""``Invocation``: the one input of every engine command, and the one constructor that derives it.

``from_request`` turns what a runtime hands the plugin (the CNI_* environment, the stdin config,
the node defaults, the netns fds the resident server received) into an ``Invocation``, checking
everything once in skel's order; ``protocol.dispatch`` serves it, the CLI's ``plan``/``verify``
build theirs from saved files through the same function. The engine never looks at raw CNI
variables, never re-derives a default and never duck-types a caller's object.

Stdlib only at load time, with a plain record rather than a dataclass: a DEL whose netns is gone
(and a ``mode: disabled`` request) is built and answered here without pydantic, ``dataclasses``
or ``typing``, which would cost more than the rest of that request.
"""

from __future__ import annotations

import json
import os
import re

from cniplugin.protocol.env import Record, parse_env, read_node_defaults
from cniplugin.protocol.errors import CNIError, DecodeFailure, IncompatibleVersion, \
    InvalidConfig, NotChained

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Mapping

    from cniplugin.protocol.config import PluginConfig
    from cniplugin.protocol.env import NodeDefaults
    from cniplugin.protocol.wire import Result

__all__ = ["Invocation", "from_request", "require_chained", "decode_config", "COMMAND_SINCE"]

_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*\Z")
#: The minimum config version of each command that did not exist from the start.
COMMAND_SINCE = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}


def require_chained(prev_result: object) -> None:
    """The must-be-chained check: route-tune tunes what a previous plugin attached, so an ADD
    (and the CLI's ``plan`` of one) needs that plugin's result."""
    if prev_result is None:
        raise NotChained(
            "route-tune must be chained: it needs a prevResult",
            "put route-tune last in a conflist's plugins, after an interface plugin such as "
            "macvlan (with its IPAM)")


class Invocation(Record):
    """One engine command (build it with ``from_request``, or by keyword).

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
    - ``pod_namespace``, ``pod_name``: K8S_POD_NAMESPACE / K8S_POD_NAME of CNI_ARGS ("" when the
      runtime passed none), recorded so that reports can name the pod
    - ``disabled``: ``mode: disabled``: the request passes through and the engine is not run
      (the config's mode; without a config, the stdin's or the node's)
    """

    _fields = ("command", "container_id", "ifname", "netns", "network", "cni_version",
               "state_dir", "config", "prev_result", "raw", "pod_netns_fd", "node_netns_fd",
               "disabled", "pod_namespace", "pod_name")
    _defaults = {"config": None, "prev_result": None, "raw": {}, "pod_netns_fd": None,
                 "node_netns_fd": None, "disabled": False, "pod_namespace": "", "pod_name": ""}
    command: str
    container_id: str
    ifname: str
    netns: str
    network: str
    cni_version: str
    state_dir: str
    config: PluginConfig | None
    prev_result: Result | None
    raw: Mapping[str, Any]
    pod_netns_fd: int | None
    node_netns_fd: int | None
    disabled: bool
    pod_namespace: str
    pod_name: str

    def _check(self) -> None:
        if self.command == "ADD":
            require_chained(self.prev_result)
        if self.config is None and self.command != "DEL":
            raise ValueError(f"{self.command} needs a validated config")


def decode_config(stdin: bytes) -> dict:
    """The stdin config as a JSON object; else ``DecodeFailure`` (code 6)."""
    try:
        raw = json.loads(stdin)
    except ValueError as exc:
        raise DecodeFailure(f"error unmarshalling network config: {exc}") from None
    if not isinstance(raw, dict):
        raise DecodeFailure("error unmarshalling network config: expected a JSON object")
    return raw


def _check_name(raw: Mapping) -> None:
    name = raw.get("name")
    if name is None or name == "":
        raise InvalidConfig("missing network name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidConfig("invalid characters found in network name", str(name))


def _netns_gone(netns: str, pod_netns_fd: int | None) -> bool:
    """True when CNI_NETNS is empty or names nothing (possible only on DEL)."""
    # A netns fd handed over by the resident server means the pod netns exists, whatever
    # the server's own mount namespace shows at that path.
    if pod_netns_fd is not None:
        return False
    return not netns or not os.path.exists(netns)


def from_request(environ: Mapping[str, str], config: bytes | Mapping[str, Any],
                 node_defaults: NodeDefaults | None = None, *, pod_netns_fd: int | None = None,
                 node_netns_fd: int | None = None) -> Invocation:
    """The ``Invocation`` of one CNI request, every check done once, in skel's order.

    CNI_* variables (code 4) → ``config`` decoded when it is stdin bytes (6) → ``name`` (7) →
    version negotiation (6, 1) → command gates (CHECK ≥ 0.4.0, GC/STATUS ≥ 1.1.0; code 1) → node
    defaults (``node_defaults``, else the file ``environ`` names; 7) → ``PluginConfig`` (7) →
    ``prevResult`` (7) → must be chained (ADD, 7). A DEL whose netns is gone gets no config
    model. Raises ``CNIError``; one raised after negotiation carries the negotiated version in
    ``cni_version`` (its reply speaks it). Inside a ``protocol.log`` request context the
    request's identity and log options are recorded as soon as they are known.
    """
    from cniplugin.protocol import log as _logging
    from cniplugin.protocol.versions import negotiate, version_at_least

    env = parse_env(environ)
    _logging.note_request(environ, env.args)
    raw = decode_config(config) if isinstance(config, (bytes, bytearray)) else dict(config)
    _check_name(raw)
    cni_version = negotiate(raw)
    try:
        command = env.command
        since = COMMAND_SINCE.get(command)
        if since and not version_at_least(cni_version, since):
            raise IncompatibleVersion(f"config version does not allow {command}",
                                      f'config is "{cni_version}", {command} needs {since} or '
                                      f'later')
        if node_defaults is None:
            node_defaults = read_node_defaults(environ)
        _logging.set_request_options(
            _logging.effective_log_options(node_defaults.values, raw.get("logOptions")))
        _logging.get_logger().debug("%s: config version %s", command, cni_version)
        model = prev_result = None
        if command == "DEL" and _netns_gone(env.netns, pod_netns_fd):
            # The light DEL: no config model (no pydantic); the engine works from the state store.
            from cniplugin.records.defaults import node_state_dir, normalise_mode
            disabled = normalise_mode(raw.get("mode", node_defaults.values.get(
                "mode", "auto"))) == "disabled"
            state_dir = node_state_dir(node_defaults.values)
        else:
            from cniplugin.protocol.config import build
            model = build(raw, node_defaults)  # option errors are code 7 before anything
            if raw.get("prevResult") is not None:
                from cniplugin.protocol.wire import parse_result
                prev_result = parse_result(raw["prevResult"], cni_version)
            disabled, state_dir = model.disabled, model.state_dir
        return Invocation(
            command=command, container_id=env.container_id, ifname=env.ifname, netns=env.netns,
            network=str(raw.get("name", "")), cni_version=cni_version, state_dir=state_dir,
            config=model, prev_result=prev_result, raw=raw, pod_netns_fd=pod_netns_fd,
            node_netns_fd=node_netns_fd, disabled=disabled,
            pod_namespace=env.args.pod_namespace, pod_name=env.args.pod_name)
    except CNIError as error:
        error.cni_version = cni_version
        raise
