"""The CNI protocol, transport-agnostic: environment + stdin in, ``Outcome`` out.

``run`` does what Go's ``skel`` does, in this order: CNI_COMMAND (empty: the about text on stderr,
exit 0) → VERSION (no stdin) → the other CNI_* variables (code 4) → stdin JSON (6) → ``name`` (7)
→ version negotiation (``cniVersion`` + 1.1.0 ``cniVersions``; malformed 6, unsupported 1) →
command gates (CHECK ≥ 0.4.0, GC/STATUS ≥ 1.1.0; code 1) → ``prevResult`` and ``PluginConfig``
(7) → the engine. Differences from skel: the container id and ifname are checked before stdin is
parsed (so a request with several faults reports code 4 first), and a malformed version string is
code 6 for every command (Go gives 6 only on CHECK and 1 elsewhere).

The checks themselves, from CNI_* to the must-be-chained rule, are
``protocol.invocation.from_request``: the one constructor of the engine's input, which the CLI
uses too. This module turns its ``Invocation`` or its error into the reply.

Import cost is part of the contract: this module imports only the stdlib at load time. pydantic
arrives with ``protocol.wire``/``protocol.config`` when a result or config must be validated, pyroute2 only with
the engine. VERSION and the about text need neither; a DEL whose netns is gone builds its
``Invocation`` without a config model (no pydantic): its node-side cleanup works from the state
store.

Every failure is one JSON object on stdout (``cniVersion``, ``code``, ``msg``, ``details``) and
exit 1; an unexpected exception is code 999 with its traceback only in the log. The ``Outcome``
also carries that code (0 for success) and the state dir of the request's ``Invocation``, so
that a transport counts the request without parsing the reply or reading the node defaults again.
"""

from __future__ import annotations

import json

from cniplugin._version import SUPPORTED_VERSIONS, about_text, version_reply
from cniplugin.protocol.errors import CNIError, InternalError

# Neither ``typing`` nor ``dataclasses`` is imported at run time: together they cost more than
# the whole VERSION command (dataclasses pulls in ``inspect``). Hence plain classes below.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Mapping

    from cniplugin.protocol.invocation import Invocation
    from cniplugin.protocol.wire import Result

    Engine = Callable[[Invocation], "Result | None"]

__all__ = ["Outcome", "run", "error_outcome", "about_text", "version_reply"]

_FALLBACK_VERSION = SUPPORTED_VERSIONS[-1]


class Outcome:
    """What the plugin process prints and returns, and what the protocol layer knew about it.

    ``stdout``: exactly what goes to stdout (the result, the error JSON, or b"");
    ``exit_code``: 0 or 1; ``stderr``: only the about text (logs go through logging);
    ``code``: the CNI result code, 0 for success, else the code of the error replied (999 for an
    unexpected one); None only when whoever built the Outcome did not know it;
    ``state_dir``: the state dir the request used (its ``Invocation``'s), None when the request
    failed before an ``Invocation`` existed (or needs none: VERSION, the about text).

    The transports count the request from ``code`` and ``state_dir`` without parsing ``stdout``
    or reading the node defaults file again. Equality and repr cover every field.
    """

    __slots__ = ("stdout", "exit_code", "stderr", "code", "state_dir")

    def __init__(self, stdout: bytes, exit_code: int, stderr: bytes = b"", *,
                 code: int | None = None, state_dir: str | None = None) -> None:
        self.stdout = stdout
        self.exit_code = exit_code
        self.stderr = stderr
        self.code = 0 if code is None and exit_code == 0 else code
        self.state_dir = state_dir

    def _key(self) -> tuple:
        return (self.stdout, self.exit_code, self.stderr, self.code, self.state_dir)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Outcome) and self._key() == other._key()

    def __repr__(self) -> str:
        return (f"Outcome(stdout={self.stdout!r}, exit_code={self.exit_code}, "
                f"stderr={self.stderr!r}, code={self.code!r}, state_dir={self.state_dir!r})")


# about_text and version_reply live in cniplugin._version (import-free), so that the plugin
# executable answers them without importing this module; re-exported here.


def error_outcome(error: CNIError, cni_version: str = _FALLBACK_VERSION, *,
                  state_dir: str | None = None) -> Outcome:
    """The reply for ``error``: its JSON on stdout, exit 1, its code in ``code``."""
    return Outcome(error.reply(cni_version), 1, code=error.code, state_dir=state_dir)


def _reply_version(stdin: bytes, inv: Invocation | None) -> str:
    """The negotiated version once there is an ``Invocation``; before that the config's version
    when we support it, else the newest we speak (the error JSON is then still readable by the
    runtime that sent it)."""
    if inv is not None:
        return inv.cni_version
    try:
        declared = json.loads(stdin).get("cniVersion")
    except (ValueError, AttributeError):
        declared = None
    return declared if declared in SUPPORTED_VERSIONS else _FALLBACK_VERSION


def run(environ: Mapping[str, str], stdin: bytes, engine: Engine, *,
        pod_netns_fd: int | None = None, node_netns_fd: int | None = None,
        via: str = "") -> Outcome:
    """Serve one CNI invocation through ``engine``; never raises.

    ``engine`` runs a checked ``Invocation`` and returns ADD's result (None for the other
    commands). The caller passes it, as Go plugins pass their commands to ``skel``: the protocol
    layer never imports the engine, and a transport loads it lazily. ``via`` names the transport
    in the request's log ("in-process"; empty: not logged)."""
    command = environ.get("CNI_COMMAND", "")
    if not command:
        return Outcome(b"", 0, about_text().encode())
    if command == "VERSION":
        return Outcome(version_reply(), 0)

    from cniplugin.protocol import log as _logging
    from cniplugin.protocol.invocation import from_request

    logger = _logging.setup(environ)
    inv = None
    with _logging.request_context({"command": command}, None):
        try:
            inv = from_request(environ, stdin, pod_netns_fd=pod_netns_fd,
                               node_netns_fd=node_netns_fd)
            if via:
                logger.info("served %s", via)
            if inv.disabled:  # pass-through without importing the engine
                return _reply(inv, inv.prev_result)
            return _reply(inv, engine(inv))
        except CNIError as error:
            logger.warning("%s failed: code %d: %s%s", command, error.code, error.msg,
                           f" ({error.details})" if error.details else "")
            return error_outcome(error, error.cni_version or _reply_version(stdin, inv),
                                 state_dir=inv and inv.state_dir)
        except Exception as exc:  # the one broad catch: the edge turns surprises into 999
            logger.error("%s failed unexpectedly: %r", command, exc, exc_info=True)
            error = InternalError(f"internal error: {type(exc).__name__}: {exc}",
                                  "the traceback is in the route-tune log")
            return error_outcome(error, _reply_version(stdin, inv), state_dir=inv and inv.state_dir)


def _reply(inv: Invocation, result: Result | None) -> Outcome:
    """ADD prints its result in the negotiated version; the other commands print nothing."""
    if inv.command != "ADD":
        return Outcome(b"", 0, state_dir=inv.state_dir)
    from cniplugin.protocol.wire import dump_result
    # Go's PrintResult: json.MarshalIndent(obj, "", "    "), no trailing newline.
    return Outcome(json.dumps(dump_result(result, inv.cni_version), indent=4,
                              ensure_ascii=False).encode(), 0, state_dir=inv.state_dir)
