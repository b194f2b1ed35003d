"""pytest wiring only: the ``--run-slow`` option and the harness's fixtures (``tests/harness``).

Tests and the harness never import this module; what they share lives in ``harness.*``
(importable through ``pythonpath`` in pyproject.toml).
"""

from __future__ import annotations

import pytest

from harness.fixtures import (calico_rails, cni_env, engine, fabric, lab_session, libcni,  # noqa: F401
                              make_netns, make_rig, netns_group, overlay_lab, plugin_env,
                              rail_pod, underlay_factory)
from harness.fabric import fabric_rig  # noqa: F401


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
