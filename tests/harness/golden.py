"""Whole-text golden files under ``tests/unit/golden`` (``UPDATE_GOLDEN=1`` rewrites them), and
the one normaliser of live CLI output.

``normalise`` replaces only what differs from run to run: every lab name (netns names,
``cali<prefix>``, temp dirs) becomes ``LAB``, the given paths (a test's tmp dirs) become
``<tmp>``, the checkout's path ``<repo>``, namespace inode numbers ``inode <n>``, and MAC
addresses other than Calico's fixed one ``<mac>``. Everything else is compared to the letter.
``mask_rtt`` masks ``reach``'s round-trip times, which only a live run's output has.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from harness.host import REPO

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "unit" / "golden"
_MAC = re.compile(r"\b(?!ee:ee:ee:ee:ee:ee\b)(?:[0-9a-f]{2}:){5}[0-9a-f]{2}\b")
_INODE = re.compile(r"\binode \d+")
_RTT_TEXT = re.compile(r" +\d+\.\d{3} ms")
_RTT_JSON = re.compile(r'"rtt_ms": [0-9.]+')


def normalise(text: str, prefix: str, *paths: str | Path) -> str:
    """``text`` with the run's own names replaced; ``prefix`` is the session's lab-name prefix
    (``harness.lab.NAMES.prefix``: every lab name is it plus a counter)."""
    for path in sorted((str(p) for p in paths), key=len, reverse=True):
        text = text.replace(path, "<tmp>")
    text = re.sub(re.escape(prefix) + r"[0-9a-z]*", "LAB", text.replace(str(REPO), "<repo>"))
    return _INODE.sub("inode <n>", _MAC.sub("<mac>", text))


def mask_rtt(text: str) -> str:
    """``reach`` output with its round-trip times (which differ from run to run) masked: `` <rtt>``
    in text, ``"<rtt>"`` in JSON."""
    return _RTT_JSON.sub('"rtt_ms": "<rtt>"', _RTT_TEXT.sub(" <rtt>", text))


def assert_golden(text: str, name: str) -> None:
    """``text`` equals ``tests/unit/golden/<name>`` (``UPDATE_GOLDEN=1`` rewrites the file)."""
    path = GOLDEN_DIR / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path} (run with UPDATE_GOLDEN=1 to write it)"
    assert text == path.read_text(), f"differs from {path}:\n{text}"
