"""Where route-tune's time goes, for bench/chain.py's missed goals (run inside the lab's node ns).

  cold     the in-process plugin as a runtime runs it: the lab's ``route-tune`` (the native
           forwarder) with ROUTE_TUNE_ENGINE=inprocess, which execs ``python -I -S -c <code>``
           (``cniplugin.transport.native.inprocess_argv()``). Prints its wall time next to that
           argv run directly and a bare ``python -I -S`` start, the top imports (``-X importtime``
           on that argv) and a cProfile of one ADD (the same code under ``cProfile.run``).
  warm     what the resident engine pays per request: ``protocol.dispatch.run`` with everything
           imported (the server calls exactly this), timed and profiled in this process; the
           server's round trip from a running process; the native forwarder's wall time against
           the running server, next to the floor of a C process start.
  version  ``CNI_COMMAND=VERSION``: sbr, the native forwarder (which execs the Python plugin for
           it) and the plugin's argv run directly, next to the process floors, and the import
           trace of the VERSION path.

  .venv/bin/python bench/_profile.py cold|warm|version --env ENV.json --stdin CONF.json [--n 20]

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
import sys
import tempfile
import time
from pathlib import Path

from _spawn import Spawner, maxrss_runner, peak_rss_mib, static_true

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BIN = REPO / ".venv" / "bin"
PY = str(BIN / "python")
PLUGIN = str(BIN / "route-tune")  # the native forwarder (the lab's CNI bin dir links to it)
SBR = "/usr/lib/cni/sbr"
#: What libcni (1.1.2) writes to a plugin's stdin for VERSION.
VERSION_STDIN = b'{"cniVersion":"1.0.0"}'
BARE_PY = [PY, "-I", "-S", "-c", "pass"]
SPAWNER = Spawner()


def inprocess_argv() -> list[str]:
    """What the forwarder execs for an in-process request: [python, -I, -S, -c, code]."""
    from cniplugin.transport.native import inprocess_argv as argv
    return argv(PY)


def spawn(argv: list[str], env: dict, stdin: bytes | None = b"") -> tuple[float, bytes, bytes]:
    """(wall ms, stdout, stderr) of one run; exits on failure."""
    run = SPAWNER.run(argv, env, stdin)
    if run.exit_code != 0:
        raise SystemExit(f"{argv[:4]} failed: {run.stdout[-2000:]!r} {run.stderr[-2000:]!r}")
    return run.ms, run.stdout, run.stderr


def median_ms(argv: list[str], env: dict, n: int, stdin: bytes | None = None) -> float:
    return statistics.median(spawn(argv, env, stdin)[0] for _ in range(n))


def interleaved_medians(cases: dict[str, tuple[list[str], dict]], n: int,
                        stdin: bytes | None = None) -> dict[str, float]:
    """Median wall ms of each case, run round-robin n times (load hits every case alike)."""
    walls: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(n + 1):  # the first pass warms the page cache and is dropped
        for name, (argv, env) in cases.items():
            walls[name].append(spawn(argv, env, stdin)[0])
    return {name: statistics.median(values[1:]) for name, values in walls.items()}


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
    """(sum of the top-level imports' cumulative ms, the biggest imports of depth 0 and 1) from
    ``-X importtime`` output.  A depth-1 import is named "parent > child": it is part of its
    parent's time, which importtime prints after its children."""
    top, total, children = [], 0.0, []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, _, rest = line.partition(":")
        _self_us, cum_us, name = rest.split("|", 2)
        depth = (len(name) - len(name.lstrip()) - 1) // 2  # " name" at depth 0, then 2 more per level
        ms, name = int(cum_us) / 1000, name.strip()
        if depth == 1:
            children.append((ms, name))
        elif depth == 0:
            total += ms
            top += [(ms, name)] + [(child_ms, f"{name} > {child}") for child_ms, child in children]
            children = []
    return total, sorted(top, reverse=True)[:limit]


def import_trace(env: dict, stdin: bytes | None, limit: int) -> tuple[float, list[tuple[float, str]]]:
    """``-X importtime`` of one run of the in-process argv."""
    python, *flags = inprocess_argv()
    _, _, stderr = spawn([python, "-X", "importtime", *flags], env, stdin)
    return importtime(stderr.decode(errors="replace"), limit)


def cold(env: dict, stdin: bytes, n: int) -> None:
    env = {**env, "ROUTE_TUNE_ENGINE": "inprocess"}
    add_env, del_env = {**env, "CNI_COMMAND": "ADD"}, {**env, "CNI_COMMAND": "DEL"}
    argv = inprocess_argv()
    walls, direct = [], []
    for _ in range(n):
        walls.append(spawn([PLUGIN], add_env, stdin)[0])
        spawn([PLUGIN], del_env, stdin)
        direct.append(spawn(argv, add_env, stdin)[0])
        spawn(argv, del_env, stdin)
    bare = median_ms(BARE_PY, {}, n)
    print("### in-process ADD (`route-tune` = native forwarder, ROUTE_TUNE_ENGINE=inprocess, "
          "execs `python -I -S -c <code>`)\n")
    print(f"- wall: median {statistics.median(walls):.1f} ms over {n} ADDs through the forwarder (each "
          f"followed by a DEL); the same argv run directly {statistics.median(direct):.1f} ms; interpreter "
          f"floor `python -I -S -c pass` {bare:.1f} ms")
    total, top = import_trace(add_env, stdin, 12)
    spawn([PLUGIN], del_env, stdin)
    print(f"- imports (`python -X importtime -I -S -c <code>`, top-level cumulative, one ADD): {total:.1f} ms "
          "in all; the biggest:")
    for ms, name in top:
        print(f"    {ms:7.1f} ms  {name}")
    with tempfile.NamedTemporaryFile(suffix=".prof") as out:
        python, flags, code = argv[0], argv[1:-1], argv[-1]
        spawn([python, *flags, f"import cProfile;cProfile.run({code!r},{out.name!r})"], add_env, stdin)
        spawn([PLUGIN], del_env, stdin)
        stats = pstats.Stats(out.name)
    print(f"- cProfile of one ADD (total {stats.total_tt * 1000:.1f} ms profiled; the profiler inflates it), "
          "route-tune's own functions by cumulative time:")
    print(top_stats(stats, "cumulative", 14, only="cniplugin"))
    print("- everything by own time (tottime):")
    print(top_stats(stats, "tottime", 12))
    memory(add_env, del_env, stdin)
    print()


#: Run the in-process plugin's -c code under tracemalloc; print the peak, and the live memory at
#: exit by the innermost cniplugin line on each allocation's stack (which of our imports or calls
#: it comes from).
TRACEMALLOC_CODE = """import collections, sys, tracemalloc
tracemalloc.start(64)
try:
    exec({code!r}, {{"__name__": "__main__"}})
except SystemExit:
    pass
snapshot, peak = tracemalloc.take_snapshot(), tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
by_line = collections.Counter()
for trace in snapshot.traces:
    ours = [f for f in trace.traceback if "/cniplugin/" in f.filename]
    by_line[f"{{ours[-1].filename}}:{{ours[-1].lineno}}" if ours else "(not under cniplugin)"] += trace.size
sys.stderr.write("\\ntracemalloc %d %d\\n" % (peak, sum(by_line.values())))
for where, size in by_line.most_common({limit}):
    sys.stderr.write("tracemalloc-line %d %s\\n" % (size, where))
"""


def memory(add_env: dict, del_env: dict, stdin: bytes, limit: int = 10) -> None:
    """Peak RSS of an in-process ADD against the bare interpreter's, and what Python allocates."""
    argv = inprocess_argv()
    with tempfile.TemporaryDirectory(prefix="rtk-rss-") as tmp:
        runner = maxrss_runner(Path(tmp))
        add_rss = peak_rss_mib(runner, SPAWNER, [PLUGIN], add_env, stdin)
        spawn([PLUGIN], del_env, stdin)
        bare_rss = peak_rss_mib(runner, SPAWNER, BARE_PY, {})
        floor_rss = peak_rss_mib(runner, SPAWNER, ["/bin/true"], {})
    python, flags, code = argv[0], argv[1:-1], argv[-1]
    _, _, stderr = spawn([python, *flags, TRACEMALLOC_CODE.format(code=code, limit=limit)], add_env, stdin)
    spawn([PLUGIN], del_env, stdin)
    lines = stderr.decode(errors="replace").splitlines()
    peak, live = next(map(int, l.split()[1:3]) for l in lines if l.startswith("tracemalloc "))
    places = [l.split(" ", 2)[1:] for l in lines if l.startswith("tracemalloc-line ")]
    print(f"- peak RSS (ru_maxrss through a static C runner, whose own floor `/bin/true` is {floor_rss:.1f} MiB): "
          f"in-process ADD {add_rss:.1f} MiB, bare `python -I -S -c pass` {bare_rss:.1f} MiB, so the plugin's "
          f"imports and work add {add_rss - bare_rss:.1f} MiB")
    print(f"- Python allocations of one ADD (tracemalloc, the same code): peak {peak / 2**20:.1f} MiB, "
          f"{live / 2**20:.1f} MiB live at exit, by the innermost route-tune line on the allocation's stack:")
    for size, name in places:
        print(f"    {int(size) / 2**20:7.2f} MiB  {name.replace(str(REPO) + '/', '').replace(sys.prefix, '<venv>')}")


def with_floors(cases: dict[str, tuple[list[str], dict]], n: int,
                stdin: bytes | None = None) -> tuple[dict[str, float], str]:
    """interleaved_medians of `cases` plus the process floors (keys "true", "/bin/true", "python"),
    and a text on the floors."""
    with tempfile.TemporaryDirectory(prefix="rtk-floor-") as tmp:
        true, static = static_true(Path(tmp))
        walls = interleaved_medians({**cases, "true": ([str(true)], {}), "/bin/true": (["/bin/true"], {}),
                                     "python": (BARE_PY, {})}, n, stdin)
    kind = "static" if static else "dynamic (no static libc here)"
    return walls, (f"process floors: our own {kind} C `true` {walls['true']:.1f} ms, `/bin/true` (dynamic) "
                   f"{walls['/bin/true']:.1f} ms, `python -I -S -c pass` {walls['python']:.1f} ms")


def warm(env: dict, stdin: bytes, n: int, title: str) -> None:
    from cniplugin.transport.plugin import serve_request
    add_env, del_env = {**env, "CNI_COMMAND": "ADD"}, {**env, "CNI_COMMAND": "DEL"}

    def cycle(profiler: cProfile.Profile | None = None) -> tuple[float, float]:
        times = []
        for e in (add_env, del_env):
            start = time.perf_counter()
            if profiler:
                profiler.enable()
            out = serve_request(e, stdin, via="bench-profile")
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
    res_add, res_del = {**res_env, "CNI_COMMAND": "ADD"}, {**res_env, "CNI_COMMAND": "DEL"}
    from cniplugin.transport import shim as _shim  # the Python client: the server's round trip without a process start
    rt_add, rt_del = [], []
    for _ in range(n):
        for e, acc in ((res_add, rt_add), (res_del, rt_del)):
            start = time.perf_counter()
            code, out, _ = _shim.forward(e, stdin)
            acc.append((time.perf_counter() - start) * 1000)
            if code:
                raise SystemExit(f"forward failed: {out!r}")
    fwd_add, fwd_del = [], []
    for _ in range(n):
        fwd_add.append(spawn([PLUGIN], res_add, stdin)[0])
        fwd_del.append(spawn([PLUGIN], res_del, stdin)[0])
    floors, floor_text = with_floors({}, n)
    add_ms = statistics.median(t[0] for t in timed)
    del_ms = statistics.median(t[1] for t in timed)
    fwd_add_ms, rt_add_ms = statistics.median(fwd_add), statistics.median(rt_add)
    print(f"### {title or 'resident engine, per request'}\n")
    print(f"- engine work (`protocol.dispatch.run`, warm, in one process = what the server runs per request): "
          f"ADD {add_ms:.1f} ms, DEL {del_ms:.1f} ms (medians of {n})")
    print(f"- server round trip (`transport.shim.forward` from a running process: socket, fds, server thread, run): "
          f"ADD {rt_add_ms:.1f} ms, DEL {statistics.median(rt_del):.1f} ms")
    print(f"- `route-tune` native forwarder (static C) forwarding to the server, spawn to exit: ADD "
          f"{fwd_add_ms:.1f} ms, DEL {statistics.median(fwd_del):.1f} ms; {fwd_add_ms - rt_add_ms:+.1f} ms "
          f"against the in-process client's round trip, of which a C process start is about {floors['true']:.1f} ms")
    print(f"- {floor_text}")
    print(f"- cProfile over {n} warm ADD+DEL pairs, route-tune's functions by cumulative time "
          f"(total {stats.total_tt * 1000 / n:.1f} ms per pair, profiler-inflated):")
    print(top_stats(stats, "cumulative", 16, only="cniplugin", per=n))
    print("- everything by own time (tottime):")
    print(top_stats(stats, "tottime", 12, per=n))
    print()


def version(env: dict, n: int) -> None:
    env = {**env, "CNI_COMMAND": "VERSION"}
    walls, floor_text = with_floors({"sbr": ([SBR], env), "route-tune": ([PLUGIN], env),
                                     "direct": (inprocess_argv(), env)}, n, VERSION_STDIN)
    total, top = import_trace(env, VERSION_STDIN, 10)
    rt, direct, bare = walls["route-tune"], walls["direct"], walls["python"]
    print("### VERSION start-up (`CNI_COMMAND=VERSION`, spawn to exit)\n")
    print(f"- sbr {walls['sbr']:.1f} ms; `route-tune` (native forwarder, execs the plugin) {rt:.1f} ms; "
          f"the plugin's argv `python -I -S -c <code>` run directly {direct:.1f} ms (medians of {n}, "
          "interleaved with the floors)")
    print(f"- where route-tune's {rt:.1f} ms go: the forwarder's start and exec {rt - direct:.1f} ms (a static "
          f"C start alone {walls['true']:.1f} ms), interpreter floor {bare:.1f} ms, the plugin's VERSION path "
          f"(imports, answer, exit) {direct - bare:.1f} ms")
    print(f"- {floor_text}")
    print(f"- imports of the VERSION path (`python -X importtime -I -S -c <code>`, one run, top-level "
          f"cumulative): {total:.1f} ms in all; the biggest: " + ", ".join(f"{name} {ms:.1f}" for ms, name in top))
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("cold", "warm", "version"))
    parser.add_argument("--env", required=True)
    parser.add_argument("--stdin", required=True)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **json.loads(Path(args.env).read_text())}
    stdin = Path(args.stdin).read_bytes()
    if args.kind == "cold":
        cold(env, stdin, min(args.n, 10))
    elif args.kind == "version":
        version(env, args.n)
    else:
        warm(env, stdin, args.n, args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
