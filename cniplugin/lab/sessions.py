"""Names for labs that share one machine with other processes' labs.

A lab name is ``<tag><pid in base 36>x<n>``: every test or benchmark process owns its names, and a
process only removes leftovers whose owner is gone (a crashed earlier run), never a live lab of a
parallel run. The age guard covers owners in another pid namespace, invisible in /proc. The pid
and the counter have fixed widths, so every name of a tag has one length: tables the CLI pads to
its longest name come out alike in every run (the golden-text tests rely on it).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from .topology import ip_batch, netns_names

__all__ = ["LabNames", "base36"]

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


#: Widths of the pid (the kernel's pid_max is at most 2**22 < 36**5) and the counter.
_PID_WIDTH, _COUNTER_WIDTH = 5, 2


def base36(n: int, width: int = 1) -> str:
    """``n`` in base 36, zero-padded to ``width`` (short, name-safe pids and counters)."""
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = _DIGITS[r] + out
        if not n:
            return out.rjust(width, "0")


class LabNames:
    """This process's lab names for ``tag`` (e.g. ``rtC``), and clean-up of dead owners' labs."""

    def __init__(self, tag: str, *, stale_after: float = 3600.0) -> None:
        self.tag = tag
        self.prefix = f"{tag}{base36(os.getpid(), _PID_WIDTH)}x"
        self.stale_after = stale_after
        self._owner = re.compile(rf"^{re.escape(tag)}([0-9a-z]+)x")
        self._counter = itertools.count(1)

    def next(self) -> str:
        """A new name, unique in this process: ``<prefix><n>``."""
        n = next(self._counter)
        if n >= 36 ** _COUNTER_WIDTH:
            raise RuntimeError(f"{self.tag}: more than {36 ** _COUNTER_WIDTH - 1} labs in one process")
        return f"{self.prefix}{base36(n, _COUNTER_WIDTH)}"

    def _stale(self, name: str, path: Path) -> bool:
        match = self._owner.match(name)
        if not match or Path(f"/proc/{int(match[1], 36)}").exists():
            return False
        try:
            return time.time() - path.stat().st_mtime > self.stale_after
        except OSError:
            return False

    def cleanup_stale(self) -> None:
        """Remove namespaces and lab temp dirs left by crashed runs of this tag."""
        dead = [n for n in netns_names(self.tag) if self._stale(n, Path("/run/netns") / n)]
        ip_batch([f"netns del {n}" for n in dead])
        for leftover in Path(tempfile.gettempdir()).glob(f"{self.tag}*x*-lab-*"):
            if self._stale(leftover.name, leftover):
                shutil.rmtree(leftover, ignore_errors=True)
