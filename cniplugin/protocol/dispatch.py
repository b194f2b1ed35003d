"""The CNI protocol, transport-agnostic: environment + stdin in, ``Outcome`` out.

``run`` does what Go's ``skel`` does, in this order: CNI_COMMAND (empty: the about text on stderr,
exit 0) → VERSION (no stdin) → the other CNI_* variables (code 4) → stdin JSON (6) → ``name`` (7)
→ version negotiation (``cniVersion`` + 1.1.0 ``cniVersions``; malformed 6, unsupported 1) →
command gates (CHECK ≥ 0.4.0, GC/STATUS ≥ 1.1.0; code 1) → ``prevResult`` and ``PluginConfig``
(7) → the engine. Differences from skel: the container id and ifname are checked before stdin is
parsed (so a request with several faults reports code 4 first), and a malformed version string is
code 6 for every command (Go gives 6 only on CHECK and 1 elsewhere).

Import cost is part of the contract: this module imports only the stdlib at load time. pydantic
arrives with ``protocol.wire``/``protocol.config`` when a result or config must be validated, pyroute2 only with
the engine. VERSION and the about text need neither; a DEL whose netns is gone builds its
``Invocation`` without a config model (no pydantic): its node-side cleanup works from the state
store.

Every failure is one JSON object on stdout (``cniVersion``, ``code``, ``msg``, ``details``) and
exit 1; an unexpected exception is code 999 with its traceback only in the log.
"""

from __future__ import annotations

import json
import os
import re

from cniplugin._version import SUPPORTED_VERSIONS, about_text, version_reply
from cniplugin.protocol.errors import CNIError, DecodeFailure, IncompatibleVersion, InternalError, \
    InvalidConfig

# Neither ``typing`` nor ``dataclasses`` is imported at run time: together they cost more than
# the whole VERSION command (dataclasses pulls in ``inspect``). Hence plain classes below.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Mapping

    from typing import Callable

    from cniplugin.protocol.env import CniEnv, NodeDefaults
    from cniplugin.protocol.invocation import Invocation
    from cniplugin.protocol.wire import Result

    Engine = Callable[[Invocation], "Result | None"]

__all__ = ["Outcome", "run", "error_outcome", "about_text", "version_reply"]

_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*\Z")
_FALLBACK_VERSION = SUPPORTED_VERSIONS[-1]
#: The minimum config version of each command that did not exist from the start.
_COMMAND_SINCE = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}


class Outcome:
    """What the plugin process prints and returns.

    ``stdout``: exactly what goes to stdout (the result, the error JSON, or b"");
    ``exit_code``: 0 or 1; ``stderr``: only the about text (logs go through logging).
    """

    __slots__ = ("stdout", "exit_code", "stderr")

    def __init__(self, stdout: bytes, exit_code: int, stderr: bytes = b"") -> None:
        self.stdout = stdout
        self.exit_code = exit_code
        self.stderr = stderr

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Outcome) and (self.stdout, self.exit_code, self.stderr) == (
            other.stdout, other.exit_code, other.stderr)

    def __repr__(self) -> str:
        return f"Outcome(stdout={self.stdout!r}, exit_code={self.exit_code}, stderr={self.stderr!r})"


# ---------------------------------------------------------------- versions (stdlib only)

# about_text and version_reply live in cniplugin._version (import-free), so that the plugin
# executable answers them without importing this module; re-exported here.


# ---------------------------------------------------------------- replies

def _encode(obj: dict) -> bytes:
    # Go's PrintResult: json.MarshalIndent(obj, "", "    "), no trailing newline.
    return json.dumps(obj, indent=4, ensure_ascii=False).encode()


def error_outcome(error: CNIError, cni_version: str = _FALLBACK_VERSION) -> Outcome:
    """The reply for ``error``: its JSON on stdout, exit 1."""
    return Outcome(_encode(error.to_reply(cni_version)), 1)


def _reply_version(stdin: bytes) -> str:
    """For an error before negotiation: the config's version when we support it, else the
    newest we speak (the error JSON is then still readable by the runtime that sent it)."""
    try:
        declared = json.loads(stdin).get("cniVersion")
    except (ValueError, AttributeError):
        declared = None
    return declared if declared in SUPPORTED_VERSIONS else _FALLBACK_VERSION


def _decode(stdin: bytes) -> dict:
    try:
        raw = json.loads(stdin)
    except ValueError as exc:
        raise DecodeFailure(f"error unmarshalling network config: {exc}") from None
    if not isinstance(raw, dict):
        raise DecodeFailure("error unmarshalling network config: expected a JSON object")
    return raw


def _check_name(raw: dict) -> None:
    name = raw.get("name")
    if name is None or name == "":
        raise InvalidConfig("missing network name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidConfig("invalid characters found in network name", str(name))


def _log_fields(env: CniEnv) -> dict:
    return {"containerID": env.container_id, "netns": env.netns, "ifname": env.ifname,
            "podNamespace": env.args.pod_namespace, "podName": env.args.pod_name,
            "command": env.command}


def _netns_gone(env: CniEnv, pod_netns_fd: int | None) -> bool:
    """True when CNI_NETNS is empty or names nothing (possible only on DEL)."""
    # A netns fd handed over by the resident server means the pod netns exists, whatever
    # the server's own mount namespace shows at that path.
    if pod_netns_fd is not None:
        return False
    return not env.netns or not os.path.exists(env.netns)


# ---------------------------------------------------------------- dispatch

def run(environ: Mapping[str, str], stdin: bytes, engine: Engine, *,
        pod_netns_fd: int | None = None, node_netns_fd: int | None = None,
        via: str = "") -> Outcome:
    """Serve one CNI invocation through ``engine``; never raises.

    ``engine`` runs a checked ``Invocation`` and returns ADD's result (None for the other
    commands). The caller passes it, as Go plugins pass their commands to ``skel``: the protocol
    layer never imports the engine, and a transport loads it lazily."""
    command = environ.get("CNI_COMMAND", "")
    if not command:
        return Outcome(b"", 0, about_text().encode())
    if command == "VERSION":
        return Outcome(version_reply(), 0)

    from cniplugin.protocol import log as _logging
    from cniplugin.protocol.env import parse_env, read_node_defaults
    from cniplugin.protocol.versions import negotiate, version_at_least

    logger = _logging.setup(environ)
    reply_version: str | None = None  # known once stdin is decoded and negotiated
    fields: dict = {"command": command}
    with _logging.request_context(fields, None):
        try:
            env = parse_env(environ)
            fields.update(_log_fields(env))
            raw = _decode(stdin)
            _check_name(raw)
            reply_version = negotiate(raw)
            since = _COMMAND_SINCE.get(command)
            if since and not version_at_least(reply_version, since):
                raise IncompatibleVersion(f"config version does not allow {command}",
                                          f'config is "{reply_version}", {command} needs '
                                          f'{since} or later')
            node_defaults = read_node_defaults(environ)
            _logging.set_request_options(
                _logging.effective_log_options(node_defaults.values, raw.get("logOptions")))
            if via:
                logger.info("served %s", via)
            return _dispatch(_Parsed(command, env, raw, reply_version, node_defaults,
                                     pod_netns_fd, node_netns_fd), engine, logger)
        except CNIError as error:
            logger.warning("%s failed: code %d: %s%s", command, error.code, error.msg,
                           f" ({error.details})" if error.details else "")
            return error_outcome(error, reply_version or _reply_version(stdin))
        except Exception as exc:  # the one broad catch: the edge turns surprises into 999
            logger.error("%s failed unexpectedly: %r", command, exc, exc_info=True)
            error = InternalError(f"internal error: {type(exc).__name__}: {exc}",
                                  "the traceback is in the route-tune log")
            return error_outcome(error, reply_version or _reply_version(stdin))


class _Parsed:
    """A request as ``run`` has checked it so far (the engine gets an ``Invocation``)."""

    __slots__ = ("command", "env", "raw", "cni_version", "node_defaults", "pod_netns_fd",
                 "node_netns_fd")

    def __init__(self, command: str, env: CniEnv, raw: dict, cni_version: str,
                 node_defaults: NodeDefaults, pod_netns_fd: int | None,
                 node_netns_fd: int | None) -> None:
        self.command, self.env, self.raw, self.cni_version = command, env, raw, cni_version
        self.node_defaults = node_defaults
        self.pod_netns_fd, self.node_netns_fd = pod_netns_fd, node_netns_fd


def _dispatch(parsed: _Parsed, engine: Engine, logger) -> Outcome:
    from cniplugin.records import defaults as _defaults
    command, env, raw, cni_version = parsed.command, parsed.env, parsed.raw, parsed.cni_version
    node_defaults, pod_netns_fd = parsed.node_defaults, parsed.pod_netns_fd
    config = prev_result = None
    if command == "DEL" and _netns_gone(env, pod_netns_fd):
        # The light DEL: no config model (no pydantic); the engine works from the state store.
        mode = _defaults.normalise_mode(raw.get("mode", node_defaults.values.get("mode", "auto")))
        state_dir = node_defaults.values.get("stateDir", _defaults.STATE_DIR)
    else:
        from cniplugin.protocol import config as _config
        config = _config.build(raw, node_defaults)  # option errors are code 7 before anything
        raw_prev = raw.get("prevResult")
        if raw_prev is not None:
            from cniplugin.protocol import wire as _wire
            prev_result = _wire.parse_result(raw_prev, cni_version)
        mode, state_dir = config.mode, config.state_dir
    logger.debug("%s: config version %s", command, cni_version)
    if command == "ADD":
        from cniplugin.protocol.invocation import require_chained
        require_chained(prev_result)
    if mode == "disabled":  # pass-through without importing the engine
        if command == "ADD":
            return _result_outcome(prev_result, cni_version)
        return Outcome(b"", 0)

    from cniplugin.protocol.invocation import Invocation
    inv = Invocation(command, env.container_id, env.ifname, env.netns, str(raw.get("name", "")),
                     cni_version, state_dir, config, prev_result, raw, pod_netns_fd,
                     parsed.node_netns_fd)
    result = engine(inv)
    if command == "ADD":
        return _result_outcome(result, cni_version)
    return Outcome(b"", 0)


def _result_outcome(result: Result, cni_version: str) -> Outcome:
    from cniplugin.protocol.wire import dump_result
    return Outcome(_encode(dump_result(result, cni_version)), 0)
