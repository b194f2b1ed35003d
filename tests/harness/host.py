"""What every suite needs of the host: where the installed executables live, the one
root/CI rule (``require``, ``require_root``), the one plugin runner (``run_plugin``), a thread
inside a netns (``in_netns``) and the one wait (``wait_until``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
ROUTE_TUNE = VENV_BIN / "route-tune"  # the native forwarder bin/dev setup builds (execs the venv python)
CNI_ROUTE_TUNE = VENV_BIN / "cni-route-tune"
PYTHON = VENV_BIN / "python"

T = TypeVar("T")


def require(*problems: str) -> None:
    """Skip when any of ``problems`` (reasons a test cannot run here) is given; with env ``CI``
    set, fail instead (a CI run must never go green by silently skipping tests)."""
    reason = ", ".join(p for p in problems if p)
    if not reason:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
    pytest.skip(reason)


def require_root(*tools: str) -> None:
    """``require`` root and every one of ``tools`` on PATH."""
    require(*([] if os.geteuid() == 0 else ["needs root"]),
            *(f"needs `{tool}` on PATH" for tool in tools if shutil.which(tool) is None))


def run_plugin(env: dict[str, str], stdin: bytes | str | dict | None = None, *,
               executable: Path = ROUTE_TUNE, args: tuple[str, ...] = (), netns: str | None = None,
               wrap: tuple[str, ...] = (), cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run an installed executable as a runtime would: exactly ``env`` (plus PATH unless ``env``
    has one), ``stdin`` piped (a dict as JSON), output captured as bytes. ``netns``: inside that
    named netns (``ip netns exec``); ``wrap``: a command prefix (``unshare -n``, ``setpriv ...``)."""
    if isinstance(stdin, dict):
        stdin = json.dumps(stdin)
    if isinstance(stdin, str):
        stdin = stdin.encode()
    inside = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run([*inside, *wrap, str(executable), *args],
                          input=stdin if stdin is not None else b"",
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
                          capture_output=True, check=False, cwd=cwd)


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread that entered netns ``name`` (thread-local setns, as the
    engine and the resident server do) and return its result, re-raising its exception."""
    from cniplugin.kernel import netns as _netns
    box: dict[str, object] = {}

    def body() -> None:
        try:
            fd = _netns.open_netns(f"/run/netns/{name}")
            try:
                with _netns.entered(fd):
                    box["value"] = fn()
            finally:
                os.close(fd)
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy (returned). ``timeout`` only keeps a
    broken run from hanging: it is generous, never a bound on how fast things must happen."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout:g} s: {what or predicate}")
        time.sleep(0.02)
