"""Measure the wall time of route-tune's start-up paths against a bare interpreter start.

Run:  .venv/bin/python bench/startup.py [--runs 20] [--lab]
Prints a Markdown table (median and min over the runs, in milliseconds) for bench/README.md.
Each command runs as a runtime would run it: the installed executables (the venv's `route-tune` is the native forwarder), env + stdin only.

``--lab`` (root) adds a real in-process ADD and DEL of rail 1 on a 1-rail lab (docs/lab.md):
the lab is built, macvlan + host-local attach net1, and every row, the bare interpreter
included, is then timed inside the lab's node namespace (the bench re-runs itself there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"


def _lab_cases(lab_file: str) -> list[tuple[str, list[str], dict, bytes]]:
    """The real ADD and DEL of the lab's rail 1 (in this order: each DEL undoes its ADD)."""
    lab = json.loads(Path(lab_file).read_text())
    env = {**lab["env"], "ROUTE_TUNE_ENGINE": "inprocess"}
    stdin = json.dumps(lab["stdin"]).encode()
    plugin = str(BIN / "route-tune")
    return [("ADD, real, in-process (1-rail lab)", [plugin], {**env, "CNI_COMMAND": "ADD"}, stdin),
            ("DEL, real, in-process (1-rail lab)", [plugin], {**env, "CNI_COMMAND": "DEL"}, stdin)]


def _with_lab(runs: int, prefix: str) -> int:
    """Build a 1-rail lab, attach net1 with macvlan, re-run this bench in the lab's node ns."""
    sys.path.insert(0, str(REPO))
    from cniplugin.lab.runtime import PluginEnv, PyRuntime, rail_conflist
    from cniplugin.lab.topology import OverlayLab

    with OverlayLab(prefix, rails=1, family="4") as lab:
        penv = PluginEnv(lab.tmp / "penv", family="4")
        conflist = rail_conflist(1, "4", data_dir=penv.ipam_dir)
        macvlan, route_tune = conflist["plugins"]
        runtime = PyRuntime(lab.node, penv)
        prev = runtime.invoke("ADD", macvlan, conflist, None, lab.pod_netns, "net1", "bench")
        lab_file = lab.tmp / "bench-lab.json"
        lab_file.write_text(json.dumps({
            "env": {**penv.env, "CNI_PATH": penv.cni_path, "CNI_CONTAINERID": "bench",
                    "CNI_NETNS": lab.pod_netns, "CNI_IFNAME": "net1", "CNI_ARGS": ""},
            "stdin": {**route_tune, "name": conflist["name"], "cniVersion": conflist["cniVersion"],
                      "prevResult": prev}}))
        return subprocess.run(["ip", "netns", "exec", lab.node, sys.executable, __file__,
                               "--runs", str(runs), "--inner-lab", str(lab_file)]).returncode


def _cases(scratch: str) -> list[tuple[str, list[str], dict, bytes]]:
    defaults = os.path.join(scratch, "defaults.json")
    with open(defaults, "w") as handle:
        json.dump({"logDir": os.path.join(scratch, "log"),
                   "stateDir": os.path.join(scratch, "state")}, handle)
    attach = {"CNI_CONTAINERID": "bench", "CNI_IFNAME": "net1", "CNI_PATH": "/usr/lib/cni",
              "ROUTE_TUNE_DEFAULTS": defaults}
    disabled = {"cniVersion": "1.0.0", "name": "bench", "type": "route-tune", "mode": "disabled"}
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.9.0.5/24", "gateway": "10.9.0.1"}]}
    py, plugin, cli = str(BIN / "python"), str(BIN / "route-tune"), str(BIN / "cni-route-tune")
    return [
        ("bare interpreter: `python -I -S -c pass`", [py, "-I", "-S", "-c", "pass"], {}, b""),
        ("interpreter + json: `python -I -c 'import json'`", [py, "-I", "-c", "import json"],
         {}, b""),
        ("`CNI_COMMAND=VERSION route-tune`", [plugin], {"CNI_COMMAND": "VERSION"}, b""),
        ("about text (no CNI_COMMAND)", [plugin], {}, b""),
        ("`route-tune --version`", [plugin, "--version"], {}, b""),
        ("`cni-route-tune --version`", [cli, "--version"], {}, b""),
        ("DEL, netns gone, `mode: disabled`", [plugin],
         {"CNI_COMMAND": "DEL", "CNI_NETNS": "", **attach}, json.dumps(disabled).encode()),
        ("ADD pass-through (`mode: disabled`, pydantic)", [plugin],
         {"CNI_COMMAND": "ADD", "CNI_NETNS": "/run/netns/bench", **attach},
         json.dumps({**disabled, "prevResult": prev}).encode()),
    ]


def _time_once(argv: list[str], env: dict, stdin: bytes) -> float:
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    start = time.perf_counter()
    proc = subprocess.run(argv, input=stdin, env=full_env, capture_output=True)
    elapsed = (time.perf_counter() - start) * 1000
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed: {proc.stdout!r} {proc.stderr!r}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--lab", action="store_true",
                        help="add a real in-process ADD/DEL on a 1-rail lab (root)")
    parser.add_argument("--lab-prefix", default=f"rtS{os.getpid():x}"[:11],
                        help="the lab's namespace prefix (at most 11 characters)")
    parser.add_argument("--inner-lab", help=argparse.SUPPRESS)
    args = parser.parse_args()
    runs = args.runs
    if args.lab:
        raise SystemExit(_with_lab(runs, args.lab_prefix))
    with tempfile.TemporaryDirectory(prefix="rt-bench-") as scratch:
        cases = _cases(scratch) + (_lab_cases(args.inner_lab) if args.inner_lab else [])
        samples: list[list[float]] = [[] for _ in cases]
        # Round-robin, after two warm-up rounds: background load hits every row alike.
        for round_number in range(runs + 2):
            for index, (_, argv, env, stdin) in enumerate(cases):
                elapsed = _time_once(argv, env, stdin)
                if round_number >= 2:
                    samples[index].append(elapsed)
        rows = [(case[0], row) for case, row in zip(cases, samples)]
    print(f"| command ({runs} runs) | median ms | min ms |")
    print("|---|---:|---:|")
    for name, samples in rows:
        print(f"| {name} | {statistics.median(samples):.1f} | {min(samples):.1f} |")


if __name__ == "__main__":
    main()
