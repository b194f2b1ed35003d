"""The repair benchmark: how long the node goes without a route-tune object that something
else removed, with the resident engine running.

Run (root):   .venv/bin/python bench/repair.py [--rails 8]

It builds the namespace lab (tag ``rtR``, docs/lab.md), dual stack, starts ``cni-route-tune
serve`` in its node namespace and attaches every rail of the seed pod (macvlan + host-local +
route-tune, resident). Then, from inside the node namespace:

  1. networkd's flush: every route-tune rule and hostRuleTable route of the node deleted in one
     batch; time from the first deletion until the last object is announced back (one sample:
     a second flush within the back-off window would measure the back-off).
  2. one object at a time: each node rule, route and neighbour deleted once, alone; time from the
     deletion to the kernel's announcement of the same kind of object back.

Times are taken by this process's own netlink watch (``kernel.watch``), so they include the
engine's debounce, its comparison with the state files and the repair itself. Median and p99
are printed (bench/README.md records a run; the aim is under 100 ms).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from pathlib import Path

from _spawn import start_serve

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BIN = REPO / ".venv" / "bin"
TAG = "rtR"

from cniplugin._version import RTPROT_ROUTE_TUNE  # noqa: E402
from cniplugin.engine.store import Store  # noqa: E402
from cniplugin.kernel import netns as _netns  # noqa: E402
from cniplugin.kernel.netlink import Netlink  # noqa: E402
from cniplugin.kernel.watch import Watch  # noqa: E402
from cniplugin.lab.runtime import PluginEnv, PyRuntime, RailPod  # noqa: E402
from cniplugin.lab.sessions import LabNames  # noqa: E402
from cniplugin.lab.topology import OverlayLab  # noqa: E402
from cniplugin.records.objects import Neighbour, Route, Rule  # noqa: E402

KIND = {Rule: "rule", Route: "route", Neighbour: "neighbour"}


def q(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))]


def wait_back(watch: Watch, wanted: dict[str, int], limit: float = 30.0) -> float:
    """Block until ``wanted[kind]`` route-tune objects of each kind are announced (created)."""
    deadline = time.monotonic() + limit
    left = dict(wanted)
    while any(n > 0 for n in left.values()):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"not back within {limit:g} s: {left}")
        for change in watch.wait(remaining) or []:
            if change.kind in left and not change.removed and change.proto == RTPROT_ROUTE_TUNE:
                left[change.kind] -= 1
    return time.perf_counter()


def measure(node_fd: int, store: Store) -> tuple[float, int, list[float]]:
    objs = [o for state in store.all() for o in state.desired.node_objects()]
    unique = list({o.key(): o for o in objs}.values())
    with _netns.entered(node_fd):
        watch = Watch()
    try:
        with Netlink.bound_to(node_fd) as nl:
            flushed = [o for o in unique if isinstance(o, (Rule, Route))]
            start = time.perf_counter()
            for obj in flushed:
                nl.remove(obj)
            wanted = {kind: sum(1 for o in flushed if KIND[type(o)] == kind)
                      for kind in ("rule", "route")}
            flush = (wait_back(watch, wanted) - start) * 1000
            time.sleep(0.5)
            watch.wait(0)
            singles = []
            for obj in unique:
                start = time.perf_counter()
                nl.remove(obj)
                singles.append((wait_back(watch, {KIND[type(obj)]: 1}) - start) * 1000)
                time.sleep(0.2)
                watch.wait(0)
    finally:
        watch.close()
    return flush, len(flushed), singles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rails", type=int, default=8)
    args = parser.parse_args()
    names = LabNames(TAG)
    names.cleanup_stale()
    lab = OverlayLab(names.next(), rails=args.rails, family="dual").__enter__()
    server = None
    try:
        work = lab.tmp  # removed with the lab
        sock = work / "run" / "engine.sock"
        penv = PluginEnv(work / "penv", family="dual",
                         env={"ROUTE_TUNE_ENGINE": "resident", "ROUTE_TUNE_SOCKET": str(sock)})
        server = start_serve(BIN / "cni-route-tune", sock, wrapper=("ip", "netns", "exec", lab.node),
                             env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                  "ROUTE_TUNE_DEFAULTS": str(penv.defaults_file)},
                             log=work / "server.log", timeout=30, poll=0.05)
        pod = RailPod(lab, penv, PyRuntime(lab.node, penv), container_id="rtr-bench-pod")
        pod.add_all()
        node_fd = _netns.open_netns(f"/run/netns/{lab.node}")
        try:
            flush, flushed, singles = measure(node_fd, Store(str(penv.state_dir)))
        finally:
            os.close(node_fd)
        print(f"repair latency, deletion -> restored ({args.rails} rails, dual stack, "
              f"resident engine)")
        print(f"  networkd-style flush of {flushed} objects: all back in {flush:.1f} ms")
        print(f"  one object at a time (n={len(singles)}): median {statistics.median(singles):.1f} ms,"
              f" p99 {q(singles, 0.99):.1f} ms, max {max(singles):.1f} ms")
        pod.delete_all()
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(20)
        lab.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
