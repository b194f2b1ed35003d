"""Cost of the underlay reply-steering table: ``ensure``/``remove`` per case, both backends.

Run (root):  .venv/bin/python bench/nft_steering.py [--runs 50]

In one throwaway netns (tag ``rtG``) it times the median of ``--runs`` calls of each case:
ensure on a netns without the table, ensure again (identical), ensure with other parameters
(drifted), remove (present), remove (absent); for the ctypes libnftables backend and the
``nft -f -`` fallback. The peer, measured in the same run and interleaved with the cases, is one
``nft -f -`` process adding and one deleting an empty table: every figure is also printed as a
ratio to it. Nothing outside the namespace it creates is touched; it is removed at the end.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cniplugin.kernel import netns as _netns  # noqa: E402
from cniplugin.kernel import nft as _nft  # noqa: E402

CASES = ("ensure (absent)", "ensure (identical)", "ensure (drifted)", "remove (present)",
         "remove (absent)")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peer() -> None:
    """A bare ``nft -f -`` process: add an empty table, then delete it."""
    for script in ("add table inet rtg_peer\n", "delete table inet rtg_peer\n"):
        subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)


def measure(runs: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for backend in ("libnftables", "nft-binary"):
        if backend == "nft-binary":
            _nft._lib_state[:] = [None]
        elif _nft._library() is None:
            print("libnftables.so.1 not loadable: only the nft binary is measured")
            continue
        cases: dict[str, list[float]] = {k: [] for k in (*CASES, "peer: nft -f - process")}
        for _ in range(runs):
            cases["ensure (absent)"].append(timed(_nft.ensure_reply_steering))
            cases["ensure (identical)"].append(timed(_nft.ensure_reply_steering))
            cases["ensure (drifted)"].append(timed(lambda: _nft.ensure_reply_steering("veth1")))
            cases["remove (present)"].append(timed(_nft.remove_reply_steering))
            cases["remove (absent)"].append(timed(_nft.remove_reply_steering))
            cases["peer: nft -f - process"].append(timed(peer))
        out[backend] = {k: statistics.median(v) * 1e3 for k, v in cases.items()}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    name = f"rtG-bench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        box: dict = {}

        def body() -> None:  # setns is per thread: run the whole measurement in one
            fd = _netns.open_netns(f"/run/netns/{name}")
            with _netns.entered(fd):
                box["medians"] = measure(args.runs)

        thread = threading.Thread(target=body)
        thread.start()
        thread.join()
        print(f"median of {args.runs} calls, ms (x = ratio to the peer, a bare nft process)\n")
        print("| case | " + " | ".join(box["medians"]) + " |")
        print("|---|" + "---:|" * len(box["medians"]))
        for case in (*CASES, "peer: nft -f - process"):
            cells = [f"{m[case]:.2f} ({m[case] / m['peer: nft -f - process']:.2f}x)"
                     for m in box["medians"].values()]
            print(f"| {case} | " + " | ".join(cells) + " |")
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
