"""Test-only fault points: stop the engine at a chosen step of ADD or DEL.

Two ways in, both inert unless a test asks:

* ``hook``: a callable(point) set in-process (tests of the engine); it may raise.
* the environment of the process running the engine (the ``route-tune`` executable, or the
  resident server's own environment):

  - ``ROUTE_TUNE_FAULT_LOG=<file>``: append the name of every fault point reached, one a line
    (run a clean ADD first to count its points);
  - ``ROUTE_TUNE_FAULT_AT=<N>[,<M>...]``: act at the N-th (and M-th...) point reached by this
    request (1-based; several: a rollback's own steps can be made to fail after the first);
  - ``ROUTE_TUNE_FAULT_ACTION=kill|raise`` (default kill): SIGKILL the process (a crash:
    nothing after it runs, no rollback) or raise ``InjectedFault`` (the normal rollback runs).

It can only stop route-tune, never make it do anything else: the worst a stray variable does
is fail the request, which the runtime retries. docs/routing.md lists the points.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

#: In-process hook, set by tests: called with every point name; may raise.
hook: Callable[[str], None] | None = None

_local = threading.local()  # per request: the server runs requests on several threads


class InjectedFault(RuntimeError):
    """Raised at the chosen point when ``ROUTE_TUNE_FAULT_ACTION=raise``."""


def begin() -> None:
    """Start counting the points of one request (reads the environment once)."""
    at = os.environ.get("ROUTE_TUNE_FAULT_AT", "")
    _local.count = 0
    _local.at = {int(n) for n in at.split(",") if n.strip().isdigit()}
    _local.action = os.environ.get("ROUTE_TUNE_FAULT_ACTION", "kill")
    _local.log = os.environ.get("ROUTE_TUNE_FAULT_LOG", "")


def point(name: str) -> None:
    """A fault point: the hook sees it, the log records it, the N-th one acts."""
    if hook is not None:
        hook(name)
    at, log = getattr(_local, "at", ()), getattr(_local, "log", "")
    if not (at or log):
        return
    _local.count += 1
    if log:
        with open(log, "a") as f:  # written (to the page cache) before any kill below
            f.write(name + "\n")
    if _local.count in at:
        if _local.action == "raise":
            raise InjectedFault(f"injected fault at point {_local.count} ({name})")
        os.kill(os.getpid(), signal.SIGKILL)
