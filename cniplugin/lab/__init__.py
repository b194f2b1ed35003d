"""The route-tune lab: a multi-NIC pod in network namespaces, driven through real CNI runtimes.

- `topology.OverlayLab`: node, Calico-style pod eth0, K rail gateways (docs/lab.md).
- `runtime.Libcni`: Debian's libcni through our Go runner; `runtime.PyRuntime`: a Python mimic.
- `demo.main`: `cni-route-tune demo`.

Used by the demo, the end-to-end tests and the benchmarks; it drives `ip` via subprocess and
never imports pyroute2, so it stays independent of the code under test.
"""

from __future__ import annotations

from .runtime import CniFailure, Libcni, PluginEnv, PyRuntime, RailPod, build_cnirunner, rail_conflist
from .topology import OverlayLab, cleanup, state_diff

__all__ = ["CniFailure", "Libcni", "OverlayLab", "PluginEnv", "PyRuntime", "RailPod", "build_cnirunner",
           "cleanup", "rail_conflist", "state_diff"]
