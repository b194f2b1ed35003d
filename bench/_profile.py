"""Where route-tune's time goes, for bench/chain.py's missed goals (run inside the lab's node ns).

  cold  the in-process plugin as a runtime runs it: the installed ``route-tune`` console script,
        ROUTE_TUNE_ENGINE=inprocess. Prints its wall time, the top imports (``-X importtime``)
        and a cProfile of one ADD (``python -m cProfile`` on the console script).
  warm  what the resident engine pays per request: ``protocol.dispatch.run`` with everything imported
        (the server calls exactly this), timed and profiled in this process; plus the forwarding
        executable's own wall time against the running server and a bare interpreter start.

  .venv/bin/python bench/_profile.py cold|warm --env ENV.json --stdin CONF.json [--n 20]

ENV.json: the CNI_* / ROUTE_TUNE_* variables of an attached rail (net1 made by [macvlan,
host-local]); CONF.json: route-tune's stdin (with that prevResult). Every ADD is followed by a
DEL, so the pod is left as it was.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"
PY = str(BIN / "python")
PLUGIN = str(BIN / "route-tune")


def spawn(argv: list[str], env: dict, stdin: bytes) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(argv, input=stdin, env=env, capture_output=True)
    elapsed = (time.perf_counter() - start) * 1000
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed: {proc.stdout[-2000:]!r} {proc.stderr[-2000:]!r}")
    return elapsed, proc


def top_stats(stats: pstats.Stats, sort: str, limit: int, only: str | None = None, per: int = 1) -> str:
    """The top `limit` rows of a pstats table as text (optionally only functions whose file matches)."""
    buf = io.StringIO()
    stats.stream = buf
    stats.sort_stats(sort)
    if only:
        stats.print_stats(only, limit)
    else:
        stats.print_stats(limit)
    lines = buf.getvalue().splitlines()
    start = next((i for i, l in enumerate(lines) if l.lstrip().startswith("ncalls")), 0)
    rows = [l for l in lines[start:] if l.strip()]
    if per > 1:  # show milliseconds per call cycle in a trailing comment
        rows[0] += f"   (totals over {per} requests)"
    return "\n".join("    " + r.replace(str(REPO) + "/", "").replace(sys.prefix, "<venv>") for r in rows)


def importtime(stderr: str, limit: int = 12) -> tuple[float, list[tuple[float, str]]]:
    """(sum of top-level import cumulatives, top entries) from ``-X importtime`` output (ms)."""
    top, total = [], 0.0
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, _, rest = line.partition(":")
        self_us, cum_us, name = rest.split("|", 2)
        depth = (len(name) - len(name.lstrip())) // 2
        if depth <= 1:
            total += int(cum_us) / 1000
            top.append((int(cum_us) / 1000, name.strip()))
    return total, sorted(top, reverse=True)[:limit]


def cold(env: dict, stdin: bytes, n: int) -> None:
    env = {**env, "ROUTE_TUNE_ENGINE": "inprocess"}
    add_env, del_env = {**env, "CNI_COMMAND": "ADD"}, {**env, "CNI_COMMAND": "DEL"}
    walls = []
    for _ in range(n):
        walls.append(spawn([PLUGIN], add_env, stdin)[0])
        spawn([PLUGIN], del_env, stdin)
    bare = [spawn([PY, "-I", "-S", "-c", "pass"], {}, b"")[0] for _ in range(n)]
    site = [spawn([PY, "-c", "pass"], {}, b"")[0] for _ in range(n)]
    print("### in-process ADD (console script `route-tune`, ROUTE_TUNE_ENGINE=inprocess)\n")
    print(f"- wall: median {statistics.median(walls):.1f} ms over {n} ADDs (each followed by a DEL); "
          f"bare `python -I -S -c pass` {statistics.median(bare):.1f} ms, `python -c pass` (venv site) "
          f"{statistics.median(site):.1f} ms")
    _, proc = spawn([PY, "-X", "importtime", PLUGIN], add_env, stdin)
    spawn([PLUGIN], del_env, stdin)
    total, top = importtime(proc.stderr.decode(errors="replace"))
    print(f"- imports (`-X importtime`, top-level cumulative, one ADD): {total:.1f} ms in all; the biggest:")
    for ms, name in top:
        print(f"    {ms:7.1f} ms  {name}")
    with tempfile.NamedTemporaryFile(suffix=".prof") as out:
        spawn([PY, "-m", "cProfile", "-o", out.name, PLUGIN], add_env, stdin)
        spawn([PLUGIN], del_env, stdin)
        stats = pstats.Stats(out.name)
    print(f"- cProfile of one ADD (total {stats.total_tt * 1000:.1f} ms profiled; the profiler inflates it), "
          "route-tune's own functions by cumulative time:")
    print(top_stats(stats, "cumulative", 14, only="cniplugin"))
    print("- everything by own time (tottime):")
    print(top_stats(stats, "tottime", 12))
    print()


def warm(env: dict, stdin: bytes, n: int, title: str) -> None:
    sys.path.insert(0, str(REPO))
    from cniplugin.protocol import dispatch as _protocol
    add_env, del_env = {**env, "CNI_COMMAND": "ADD"}, {**env, "CNI_COMMAND": "DEL"}

    def cycle(profiler: cProfile.Profile | None = None) -> tuple[float, float]:
        times = []
        for e in (add_env, del_env):
            start = time.perf_counter()
            if profiler:
                profiler.enable()
            out = _protocol.run(e, stdin, via="bench-profile")
            if profiler:
                profiler.disable()
            times.append((time.perf_counter() - start) * 1000)
            if out.exit_code:
                raise SystemExit(f"{e['CNI_COMMAND']} failed: {out.stdout!r}")
        return times[0], times[1]

    for _ in range(3):
        cycle()
    timed = [cycle() for _ in range(n)]
    profiler = cProfile.Profile()
    for _ in range(n):
        cycle(profiler)
    stats = pstats.Stats(profiler)
    res_env = {**env, "ROUTE_TUNE_ENGINE": "resident"}
    from cniplugin.transport import shim as _shim  # the shim's own client: the server's round trip without a process start
    rt_add, rt_del = [], []
    for _ in range(n):
        for e, acc in (({**res_env, "CNI_COMMAND": "ADD"}, rt_add), ({**res_env, "CNI_COMMAND": "DEL"}, rt_del)):
            start = time.perf_counter()
            code, out, _ = _shim.forward(e, stdin)
            acc.append((time.perf_counter() - start) * 1000)
            if code:
                raise SystemExit(f"forward failed: {out!r}")
    shim_add, shim_del = [], []
    for _ in range(n):
        shim_add.append(spawn([PLUGIN], {**res_env, "CNI_COMMAND": "ADD"}, stdin)[0])
        shim_del.append(spawn([PLUGIN], {**res_env, "CNI_COMMAND": "DEL"}, stdin)[0])
    bare = [spawn([PY, "-I", "-S", "-c", "pass"], {}, b"")[0] for _ in range(n)]
    site = [spawn([PY, "-c", "pass"], {}, b"")[0] for _ in range(n)]
    _, proc = spawn([PY, "-X", "importtime", PLUGIN], {**res_env, "CNI_COMMAND": "ADD"}, stdin)
    spawn([PLUGIN], {**res_env, "CNI_COMMAND": "DEL"}, stdin)
    imp_total, imp_top = importtime(proc.stderr.decode(errors="replace"), 8)
    add_ms = statistics.median(t[0] for t in timed)
    del_ms = statistics.median(t[1] for t in timed)
    print(f"### {title or 'resident engine, per request'}\n")
    print(f"- engine work (`protocol.dispatch.run`, warm, in one process = what the server runs per request): "
          f"ADD {add_ms:.1f} ms, DEL {del_ms:.1f} ms (medians of {n})")
    print(f"- server round trip (`transport.shim.forward` from a running process: socket, fds, server thread, run): "
          f"ADD {statistics.median(rt_add):.1f} ms, DEL {statistics.median(rt_del):.1f} ms")
    print(f"- `route-tune` executable forwarding to the server: ADD {statistics.median(shim_add):.1f} ms, "
          f"DEL {statistics.median(shim_del):.1f} ms; the process itself (interpreter, site, imports, exit) "
          f"adds about {statistics.median(shim_add) - statistics.median(rt_add):.1f} ms to the round trip")
    print(f"- the shim's imports (`-X importtime`, top-level cumulative): {imp_total:.1f} ms in all; the biggest: "
          + ", ".join(f"{name} {ms:.1f}" for ms, name in imp_top))
    print(f"- interpreter floor: `python -I -S -c pass` {statistics.median(bare):.1f} ms, "
          f"`python -c pass` (the console script's shebang, with site) {statistics.median(site):.1f} ms")
    print(f"- cProfile over {n} warm ADD+DEL pairs, route-tune's functions by cumulative time "
          f"(total {stats.total_tt * 1000 / n:.1f} ms per pair, profiler-inflated):")
    print(top_stats(stats, "cumulative", 16, only="cniplugin", per=n))
    print("- everything by own time (tottime):")
    print(top_stats(stats, "tottime", 12, per=n))
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("cold", "warm"))
    parser.add_argument("--env", required=True)
    parser.add_argument("--stdin", required=True)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **json.loads(Path(args.env).read_text())}
    stdin = Path(args.stdin).read_bytes()
    if args.kind == "cold":
        cold(env, stdin, min(args.n, 10))
    else:
        warm(env, stdin, args.n, args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
