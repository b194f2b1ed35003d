"""``route-tune``: the executable a CNI runtime runs (env + stdin in, JSON on stdout out).

Kept tiny and stdlib-only at import: the resident-engine fast path (``_shim.forward``) slots in
before the in-process call, and VERSION / ``--version`` must cost no more than an interpreter
start plus ``json``.
"""

from __future__ import annotations

import os
import sys

__all__ = ["main"]

#: Commands whose config arrives on stdin (skel reads no stdin for VERSION or the about text).
_READS_STDIN = ("ADD", "DEL", "CHECK", "GC", "STATUS")


def _print_version() -> None:
    from ._version import PLUGIN_NAME, SUPPORTED_VERSIONS, __version__
    sys.stdout.write(f"{PLUGIN_NAME} {__version__}\n"
                     f"CNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)}\n")


def main() -> None:
    """Run one CNI invocation and exit with its status."""
    if sys.argv[1:] in (["--version"], ["-V"]):
        _print_version()
        sys.exit(0)
    from . import _protocol

    environ = os.environ
    if environ.get("CNI_COMMAND", "") in _READS_STDIN:
        try:
            stdin = sys.stdin.buffer.read()
        except OSError as exc:
            from ._errors import IOFailure
            outcome = _protocol.error_outcome(IOFailure(f"error reading from stdin: {exc}"))
            _emit(outcome)
        # (the resident-engine fast path goes here: forward(environ, stdin) when it answers)
    else:
        stdin = b""
    _emit(_protocol.run(environ, stdin))


def _emit(outcome) -> None:
    if outcome.stderr:
        sys.stderr.buffer.write(outcome.stderr)
        sys.stderr.flush()
    sys.stdout.buffer.write(outcome.stdout)
    sys.stdout.flush()
    sys.exit(outcome.exit_code)
