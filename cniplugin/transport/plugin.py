"""``route-tune``: the executable a CNI runtime runs (env + stdin in, JSON on stdout out).

Kept tiny and stdlib-only at import: the resident-engine fast path (``transport.shim.forward``) slots in
before the in-process call, and VERSION / ``--version`` must cost no more than an interpreter
start plus ``json``.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

__all__ = ["main", "serve_in_process", "serve_request", "FORWARDER_FAILED"]

#: Commands whose config arrives on stdin (skel reads no stdin for VERSION or the about text).
_READS_STDIN = ("ADD", "DEL", "CHECK", "GC", "STATUS")
#: Passed by the native forwarder (transport/forwarder.c) when the resident engine may have run
#: the request but gave no complete reply: only the code-11 reply is printed, nothing is re-run.
FORWARDER_FAILED = "--forwarder-failed"


def main() -> NoReturn:
    """Run one CNI invocation and exit with its status."""
    args = sys.argv[1:]
    if args in (["--version"], ["-V"]):
        _print_version()
        sys.exit(0)
    environ = os.environ
    command = environ.get("CNI_COMMAND", "")
    if len(args) == 3 and args[0] == FORWARDER_FAILED:
        from cniplugin.transport.shim import try_again_reply
        _reply_and_exit(try_again_reply(_read_stdin(command), args[1], args[2]), b"", 1)
    if command in ("VERSION", ""):
        # VERSION and the about text: no stdin, no json, no dispatch module.
        from cniplugin._version import about_text, version_reply
        if command:
            _reply_and_exit(version_reply(), b"", 0)
        _reply_and_exit(b"", about_text().encode(), 0)
    stdin = _read_stdin(command)
    if command in _READS_STDIN:
        # Fast path: a resident engine (`cni-route-tune serve`) has everything imported already;
        # `transport.shim` imports only C-level stdlib, so trying it is nearly free.
        from cniplugin.transport import shim as _shim
        if _shim.mode(environ) != "inprocess":
            reply = _shim.forward(environ, stdin)
            if reply is not None:
                code, out, err = reply
                _reply_and_exit(out, err, code)
    # One request, then exit: the cyclic collector would only walk pydantic's import-time
    # objects again and again. Exit frees everything anyway.
    import gc
    gc.disable()
    # No OpenSSL in this process: pydantic.types imports hashlib (through secrets and random),
    # and loading libcrypto adds to the peak RSS and the start. Without `_hashlib`, hashlib
    # serves the same digests from CPython's built-in modules (what a no-OpenSSL build does).
    sys.modules.setdefault("_hashlib", None)
    from cniplugin.transport.pydantic_setup import disable_plugin_discovery
    disable_plugin_discovery()
    outcome = serve_in_process(environ, stdin)
    # Exit follows the reply. Interpreter shutdown would run a full cyclic collection over every
    # object pydantic and the engine created; it skips frozen objects.
    gc.freeze()
    _reply_and_exit(outcome.stdout, outcome.stderr, outcome.exit_code)


def serve_in_process(environ, stdin: bytes):
    """``main``'s in-process request: ``serve_request``, then, for a command with a config,
    counted in the state dir for the engine to export once one runs (a node running cold is
    visible). The count takes the CNI code and the state dir from dispatch's ``Outcome``: the
    reply is not parsed, and the node defaults file is not read again once the request's
    ``Invocation`` was built."""
    command = environ.get("CNI_COMMAND", "")
    counted = command in _READS_STDIN
    outcome = serve_request(environ, stdin, via="in-process" if counted else "")
    if counted:
        from cniplugin.transport.inprocess_counts import record_outcome
        record_outcome(environ, command, outcome.code, outcome.state_dir)
    return outcome


def serve_request(environ, stdin: bytes, **options):
    """One CNI request served by the real engine in this process (``protocol.dispatch.run``'s
    options: ``pod_netns_fd``, ``node_netns_fd``, ``via``). The resident server runs this too."""
    from cniplugin.protocol.dispatch import run
    return run(environ, stdin, _engine, **options)


def _engine(inv):
    """The engine's ``execute``, imported on first use: VERSION, a request refused before it
    and a ``mode: disabled`` ADD never load the engine (nor pyroute2)."""
    from cniplugin.engine.commands import execute
    return execute(inv)


def _print_version() -> None:
    from cniplugin._version import PLUGIN_NAME, SUPPORTED_VERSIONS, __version__
    sys.stdout.write(f"{PLUGIN_NAME} {__version__}\n"
                     f"CNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)}\n")


def _read_stdin(command: str) -> bytes:
    """The request's config (b"" for a command that takes none). Unreadable stdin is answered
    here, as every plugin answers it: a code-5 reply, and exit."""
    if command not in _READS_STDIN:
        return b""
    try:
        return sys.stdin.buffer.read()
    except OSError as exc:
        from cniplugin._version import SUPPORTED_VERSIONS
        from cniplugin.protocol.errors import IOFailure
        error = IOFailure(f"error reading from stdin: {exc}")
        _reply_and_exit(error.reply(SUPPORTED_VERSIONS[-1]), b"", 1)


def _reply_and_exit(stdout: bytes, stderr: bytes, exit_code: int) -> NoReturn:
    """Write the reply (stderr first, then stdout) and end the process with ``exit_code``."""
    if stderr:
        sys.stderr.buffer.write(stderr)
        sys.stderr.flush()
    sys.stdout.buffer.write(stdout)
    sys.stdout.flush()
    sys.exit(exit_code)
