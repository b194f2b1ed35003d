"""What the engine reports while it works, for whoever watches: the resident engine's metrics.

The engine calls ``timed`` around each phase of a command and ``event`` when something worth
counting happens (a probe outcome, a node repair, pod drift). With no observer installed (the
one-shot in-process plugin) both cost one attribute check, so the plugin imports nothing for
them; the resident engine installs an observer (``install``) that turns them into metrics.

Events and their fields (an observer ignores what it does not know):

- ``probe``: ``outcome`` = ``ok`` | ``gateway_unreachable`` | ``ip_conflict``
- ``repair``: ``kind`` = the object kind restored on the node (``rule``, ``route``, ...)
- ``repair_backoff``: ``kind``; a node object deleted again and again, repair paused
- ``pod_drift``: ``attachments`` = how many recorded attachments have drifted in their pods;
  ``new`` = how many of them were not drifted at the previous check (sent after every check)
"""

from __future__ import annotations

import time
from contextlib import contextmanager

__all__ = ["PHASES", "Observer", "install", "event", "timed"]

#: The phases of a command that ``timed`` measures.
PHASES = ("gather", "plan", "apply", "probe", "announce")


class Observer:
    """Receives the engine's reports; the default does nothing. Subclasses override both."""

    def phase(self, command: str, phase: str, seconds: float) -> None:
        """``command``'s ``phase`` took ``seconds``."""

    def event(self, name: str, fields: dict[str, object]) -> None:
        """Something named ``name`` happened (see the module docstring)."""


_observer: Observer | None = None


def install(observer: Observer | None) -> None:
    """Send the engine's reports to ``observer`` (None: to nobody) for the rest of the process."""
    global _observer
    _observer = observer


def event(name: str, **fields: object) -> None:
    if _observer is not None:
        _observer.event(name, fields)


@contextmanager
def timed(command: str, phase: str):
    """Time the body as ``command``'s ``phase`` (also when it raises: a failed phase took time)."""
    if _observer is None:
        yield
        return
    started = time.monotonic()
    try:
        yield
    finally:
        _observer.phase(command, phase, time.monotonic() - started)
