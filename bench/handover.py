"""What an engine handover costs: the successor's start-to-serving time, and whether requests
made during the handover waited longer than the others (``docs/resident.md``, "Upgrades without
a gap").

One engine serves a private socket; client threads send requests through the Python client
(``transport.shim.forward``, resident mode) without pause; a successor engine is started N times,
each taking the socket from the previous one. Every request's latency is recorded and split into
those that overlapped a handover (from the successor's launch to its ready file) and the others.
Needs root (the engine serves root only). Not a test: no pass/fail exit status for timings.

    sudo .venv/bin/python bench/handover.py [--handovers 10] [--clients 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _spawn import start_serve

from cniplugin.transport import shim as _shim

ROOT = Path(__file__).resolve().parents[1]
CNI_ROUTE_TUNE = ROOT / ".venv" / "bin" / "cni-route-tune"


def start_engine(sock: Path, work: Path, n: int) -> subprocess.Popen:
    """Engine n on `sock` (taking it from the one serving it), returned once its ready file exists."""
    ready = work / f"engine{n}.ready"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "ROUTE_TUNE_DEFAULTS": str(work / "defaults.json")}
    return start_serve(CNI_ROUTE_TUNE, sock, "--ready-file", str(ready), env=env,
                       log=work / f"engine{n}.stderr", ready=ready, poll=0.002)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--handovers", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: the engine answers root peers only")
    work = Path(tempfile.mkdtemp(prefix="rtH-bench-"))
    (work / "defaults.json").write_text(f'{{"logDir": "{work}/log"}}\n')
    sock = work / "run" / "engine.sock"
    env = {"ROUTE_TUNE_SOCKET": str(sock), "ROUTE_TUNE_ENGINE": "resident",
           "ROUTE_TUNE_DEFAULTS": str(work / "defaults.json"), "CNI_COMMAND": "VERSION"}
    records: list[tuple[float, float, int]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            start = time.monotonic()
            code, _, _ = _shim.forward(env, b"")
            records.append((start, time.monotonic(), code))

    proc = start_engine(sock, work, 0)
    clients = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in clients:
        thread.start()
    windows: list[tuple[float, float]] = []
    engines = [proc]
    try:
        time.sleep(1.0)
        for n in range(1, args.handovers + 1):
            launched = time.monotonic()
            proc = start_engine(sock, work, n)
            windows.append((launched, time.monotonic()))
            engines.append(proc)
            if engines[-2].wait(timeout=60) != 0:
                sys.exit(f"the replaced engine exited {engines[-2].returncode}")
            time.sleep(0.5)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
        engines[-1].terminate()
        engines[-1].wait()
    during, other = [], []
    for start, end, _ in records:
        overlaps = any(start < w_end and end > w_start for w_start, w_end in windows)
        (during if overlaps else other).append((end - start) * 1000)
    failed = sum(1 for _, _, code in records if code != 0)
    starts = [(b - a) * 1000 for a, b in windows]
    print(f"{args.handovers} handovers, {args.clients} clients, {len(records)} requests, "
          f"{failed} failed")
    print(f"successor launch -> serving: median {statistics.median(starts):.0f} ms, "
          f"max {max(starts):.0f} ms")
    for name, values in (("during a handover", during), ("otherwise", other)):
        print(f"requests {name}: {len(values)}, median {statistics.median(values):.2f} ms, "
              f"p99 {pct(values, 0.99):.2f} ms, max {max(values):.2f} ms")


if __name__ == "__main__":
    main()
