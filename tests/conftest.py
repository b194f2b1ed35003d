"""Shared test plumbing: ``require_root()`` (the one root check), the ``--run-slow`` option, where
the installed executables live, and the registration of the harness's fixtures (``tests/harness``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
ROUTE_TUNE = VENV_BIN / "route-tune"  # the native forwarder bin/dev setup builds (execs the venv python)
CNI_ROUTE_TUNE = VENV_BIN / "cni-route-tune"
PYTHON = VENV_BIN / "python"


def require_root(*tools: str) -> None:
    """Skip unless root and ``tools`` are on PATH; with env ``CI`` set, fail instead of skipping
    (a CI run must never go green by silently skipping the kernel tests)."""
    problems = [] if os.geteuid() == 0 else ["needs root"]
    problems += [f"needs `{tool}` on PATH" for tool in tools if shutil.which(tool) is None]
    if not problems:
        return
    reason = ", ".join(problems)
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
    pytest.skip(reason)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (long-running variants)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow variant: enable with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def run_plugin(env: dict[str, str], stdin: bytes | str | dict | None = None, *,
               executable: Path = ROUTE_TUNE, args: tuple[str, ...] = ()):
    """Run the installed plugin as a runtime would: only ``env`` (plus PATH), ``stdin`` piped."""
    import json
    import subprocess
    if isinstance(stdin, dict):
        stdin = json.dumps(stdin)
    if isinstance(stdin, str):
        stdin = stdin.encode()
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    return subprocess.run([str(executable), *args], input=stdin if stdin is not None else b"",
                          env=full_env, capture_output=True, check=False)


def in_netns(name: str, fn):
    """Run ``fn`` in a fresh thread that entered netns ``name`` (thread-local setns, as the
    engine and the resident server do) and return its result, re-raising its exception."""
    import threading

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
    return box["value"]


# The harness's fixtures, for every test folder (imported last: the harness imports this module).
from harness.fixtures import (engine, lab_session, libcni, make_netns, make_rig,  # noqa: E402,F401
                              netns_group, overlay_lab, plugin_env, rail_pod)
