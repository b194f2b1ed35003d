"""bench/chain.py's report: the Markdown tables of a run and the goal verdicts, from the phases'
figures (``Results``); which profile kinds the missed goals call for."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

from _phases import FOREIGN_ROUTES, HOST_TABLE, NIC_REPS, VARIANTS, VERSION_REPS

LABEL = {"a": "a [macvlan, host-local]", "b": "b + sbr", "c": "c + route-tune in-process",
         "d": "d + route-tune resident"}
#: The goals, as ratios to sbr measured in the same run.
GOAL_RESIDENT_INC = 2.5   # (d-a)/(b-a), one NIC ADD: half of the coordinator's ratio
#: The resident one-NIC ADD increment of the last run before the engine served metrics, repaired
#: node state and handed over its socket (bench/README.md), printed beside this run's.
RESIDENT_INCREMENT_BEFORE_SERVICE = 8.4
RESIDENT_INCREMENT_BEFORE_RUN = "chain.py run of 2026-12-02"
GOAL_INPROC_INC = 12.0    # (c-a)/(b-a), one NIC ADD: about 2.5x the coordinator's
GOAL_VERSION = 6.0        # VERSION start-up route-tune/sbr: no slower than the coordinator's ratio
GOAL_BURST = 1.5          # burst 16 pods x 8 rails, resident ADD wall time d/b
GOAL_FOREIGN = 1.2        # 5,000 foreign routes: ADD full/empty
GOAL_RSS_MIB, FLAT_MIB = 80.0, 2.0  # server VmRSS after 10,000 requests, and its growth
#: Peak RSS of the real coordinator's plugin process, measured side by side once (bench/README.md);
#: every route-tune plugin process must stay below it.
COORDINATOR_PEAK_RSS_MIB = 27.5
#: The earlier resident pod goal, still printed for comparison (no longer a goal).
OLD_GOAL_RESIDENT_POD = 2.0


def q(values: list[float], p: float) -> float:
    """The p-quantile (inclusive method) of values."""
    if len(values) == 1:
        return values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[int(round(p * 100)) - 1]


def summary(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), q(values, 0.10), q(values, 0.90)


def ratio(xs: list[float], ys: list[float]) -> list[float]:
    """Per-round ratios; a denominator <= 0 (noise swamped the baseline) gives inf."""
    return [x / y if y > 0 else float("inf") for x, y in zip(xs, ys)]


def fmt_row(name: str, values: list[float], unit: str = "ms", digits: int = 1) -> str:
    med, lo, hi = summary(values)
    return f"| {name} | {med:.{digits}f} | {lo:.{digits}f} | {hi:.{digits}f} |"


def span(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """'median (min-max)' of values / scale."""
    return " ".join([f"{statistics.median(values) / scale:.{digits}f}",
                     f"({min(values) / scale:.{digits}f}-{max(values) / scale:.{digits}f})"])


class Verdicts:
    """The goal lines of the report; remembers which profile kinds the missed goals call for."""

    def __init__(self, emit) -> None:
        self.emit = emit
        self.misses: list[str] = []

    def goal(self, name: str, value: float, limit: float, unit: str = "x", kind: str | None = None,
             alt: float | None = None, strict: bool = False, note: str = "") -> None:
        """PASS/MISS of value <= limit (< with strict); alt: the ratio of the medians, as a cross-check."""
        ok = value < limit if strict else value <= limit
        if value == float("inf"):
            extra = "  <- MISSED: sbr's increment b-a was <= 0 (lost in noise) in most rounds"
        else:
            extra = "" if ok else f"  <- MISSED by {value / limit:.2f}x ({value - limit:+.2f}{unit} over the goal)"
        side = f"; ratio of the medians {alt:.2f}{unit}" if alt is not None else ""
        self.emit(f"- {'PASS' if ok else 'MISS'} {name}: {value:.2f}{unit} "
                  f"(goal {'<' if strict else '<='} {limit:g}{unit}{note}{side}){extra}")
        if not ok and kind and kind not in self.misses:
            self.misses.append(kind)

    def info(self, name: str, value: float, unit: str = "x", note: str = "no goal") -> None:
        self.emit(f"    - info: {name}: {value:.2f}{unit} ({note})")


def version_table(ver: dict[str, list[float]]) -> list[str]:
    """Phase 6: each process's per-round medians, and the per-round route-tune/sbr."""
    rows = [f"VERSION start-up: `CNI_COMMAND=VERSION` (libcni's stdin), spawn to exit in ms; each round's value "
            f"is the median of {VERSION_REPS} runs per process, interleaved ({len(ver['sbr'])} rounds):",
            "", "| process / quantity | median | p10 | p90 |", "|---|---:|---:|---:|",
            fmt_row("floor: /bin/true", ver["true"]),
            fmt_row("sbr", ver["sbr"]),
            fmt_row("route-tune (native forwarder, execs `python -I -S -c`)", ver["route-tune"]),
            fmt_row("ratio route-tune/sbr (per round)", ratio(ver["route-tune"], ver["sbr"]), digits=2),
            ""]
    return rows


def burst_table(burst: dict[str, dict[str, list[float]]], pods: int, quick: bool) -> list[str]:
    """Phase 3: wall time per variant, and the per-round d/b of ADD and DEL."""
    size = f"{pods} pods x 8 rails" + (" (QUICK: the goal is for 16 pods)" if quick else "")
    rows = [f"Burst: {size} started at once (pods concurrent, each pod's rails in series); wall time until "
            f"all are done, s (median, min-max over rounds):",
            "", "| variant | rounds | ADD | DEL |", "|---|---:|---:|---:|"]
    for v in "bcd":
        adds, dels = burst[v]["add"], burst[v]["del"]
        rows.append(f"| {LABEL[v]} | {len(adds)} | {span(adds, 1000)} | "
                    f"{span(dels, 1000) if dels else 'not timed (undone via d)'} |")
    rows += [f"| ratio d/b (per round) | {len(burst['d']['add'])} | "
             f"{span(ratio(burst['d']['add'], burst['b']['add']))} | "
             f"{span(ratio(burst['d']['del'], burst['b']['del']))} |", ""]
    return rows


@dataclass
class Results:
    """What the phases measured, and the run's circumstances, as the report needs them."""

    s: dict                 # phase 1: variant -> add1/del1/add8/del8 -> per-round values
    peak: dict              # phase 2: (variant, process, command) -> ru_maxrss KiB
    burst: dict             # phase 3: variant -> add/del -> wall ms per round
    burst_pods: int
    foreign: dict           # phase 4: key+condition -> per-round ADD ms
    mem_series: list        # phase 5: (requests served, VmRSS, VmHWM)
    ver: dict               # phase 6: process -> per-round median ms
    mem_start: tuple
    mem_rounds: tuple
    mem_burst: tuple
    quick: bool
    elapsed: float
    loads: list
    state_fs: str
    phases: list            # (name, start time); "end" is appended here


def report(r: Results) -> tuple[list[str], list[str]]:
    """(the report's lines, the profile kinds its missed goals call for)."""
    s, peak, burst, burst_pods, foreign = r.s, r.peak, r.burst, r.burst_pods, r.foreign
    mem_series, ver, quick, elapsed, loads, phases = r.mem_series, r.ver, r.quick, r.elapsed, r.loads, r.phases
    mem_start, mem_rounds, mem_burst, state_fs = r.mem_start, r.mem_rounds, r.mem_burst, r.state_fs
    out: list[str] = []
    emit = out.append
    n = len(s["a"]["add1"])
    emit(f"## route-tune chain benchmark: {n} interleaved rounds, {'QUICK smoke' if quick else 'full'} run, "
         f"{elapsed:.0f} s, {time.strftime('%Y-%m-%d %H:%M')}")
    emit("")
    emit(f"{os.cpu_count()} CPUs, Linux {os.uname().release}, load average {loads[0]:.1f} at start / "
         f"{max(loads):.1f} at most (sampled at each phase) / {loads[-1]:.1f} at end; stateDir on {state_fs}; "
         "libcni 1.1.2 runner in the node netns.")
    emit("Per chain step = one runner run (spawn to exit) in ms; 8-rail pod = sum of its 8 steps in series. "
         f"One NIC: each round's value is the median of {NIC_REPS} interleaved ADD/DEL pairs (c: one pair).")
    emit("")
    emit("| variant / operation | median | p10 | p90 |")
    emit("|---|---:|---:|---:|")
    for key, title in (("add1", "one NIC ADD"), ("del1", "one NIC DEL"), ("add8", "8-rail pod ADD"),
                       ("del8", "8-rail pod DEL")):
        for v in VARIANTS:
            emit(fmt_row(f"{title}: {LABEL[v]}", s[v][key]))
    emit("")
    emit("Computed within each round (pair by pair), then median / p10 / p90 over the rounds "
         "(inf: sbr's increment was <= 0 in that round):")
    emit("")
    emit("| per-round quantity | median | p10 | p90 |")
    emit("|---|---:|---:|---:|")
    inc = {v: [s[v]["add1"][i] - s["a"]["add1"][i] for i in range(n)] for v in "bcd"}
    inc_del = {v: [s[v]["del1"][i] - s["a"]["del1"][i] for i in range(n)] for v in "bcd"}
    inc8 = {v: [(s[v]["add8"][i] - s["a"]["add8"][i]) / 8 for i in range(n)] for v in "bcd"}
    for v in "bcd":
        emit(fmt_row(f"one NIC ADD increment {v}-a (ms)", inc[v]))
    for v in "bcd":
        emit(fmt_row(f"one NIC DEL increment {v}-a (ms)", inc_del[v]))
    for v in "bcd":
        emit(fmt_row(f"8-rail pod ADD increment per NIC ({v}-a)/8 (ms)", inc8[v]))
    r_res, r_inp = ratio(inc["d"], inc["b"]), ratio(inc["c"], inc["b"])
    r_res8, r_inp8 = ratio(inc8["d"], inc8["b"]), ratio(inc8["c"], inc8["b"])
    r_pod, r_pod_c = ratio(s["d"]["add8"], s["b"]["add8"]), ratio(s["c"]["add8"], s["b"]["add8"])
    emit(fmt_row("ratio (d-a)/(b-a), one NIC ADD", r_res, digits=2))
    emit(fmt_row("ratio (c-a)/(b-a), one NIC ADD", r_inp, digits=2))
    emit(fmt_row("ratio (d-a)/(b-a), per NIC of the 8-rail pod ADD", r_res8, digits=2))
    emit(fmt_row("ratio (c-a)/(b-a), per NIC of the 8-rail pod ADD", r_inp8, digits=2))
    emit(fmt_row("ratio d/b, 8-rail pod ADD", r_pod, digits=2))
    emit(fmt_row("ratio c/b, 8-rail pod ADD", r_pod_c, digits=2))
    emit("")
    emit(f"Resident increment per NIC before the engine became a node service (metrics, repair, "
         f"handover): {RESIDENT_INCREMENT_BEFORE_SERVICE} ms median ({RESIDENT_INCREMENT_BEFORE_RUN}); "
         f"this run: {statistics.median(inc['d']):.1f} ms.")
    emit("")
    floor = max(peak.get(("floor", "true", c), 0) for c in ("ADD", "DEL")) / 1024
    emit(f"Peak RSS in MiB: ru_maxrss of each plugin process (a static C wrapper's wait4; max over one "
         f"NIC and one 8-rail pod; wrapper floor {floor:.1f} MiB included); the server's from /proc:")
    emit("")
    emit("| variant | process | ADD | DEL |")
    emit("|---|---|---:|---:|")
    for v in VARIANTS:
        for name in ("macvlan", "sbr", "route-tune"):
            if (v, name, "ADD") in peak:
                label = {"macvlan": "macvlan (incl. its host-local child)", "sbr": "sbr",
                         "route-tune": "route-tune in-process" if v == "c" else "route-tune native forwarder"}[name]
                emit(f"| {v} | {label} | {peak[(v, name, 'ADD')] / 1024:.1f} | "
                     f"{peak.get((v, name, 'DEL'), 0) / 1024:.1f} |")
    emit("")
    emit("| server (VmRSS / VmHWM, MiB) | VmRSS | VmHWM |")
    emit("|---|---:|---:|")
    emit(f"| after warm-up | {mem_start[0]:.1f} | {mem_start[1]:.1f} |")
    emit(f"| after phase 1 | {mem_rounds[0]:.1f} | {mem_rounds[1]:.1f} |")
    emit(f"| after the burst | {mem_burst[0]:.1f} | {mem_burst[1]:.1f} |")
    emit("")
    out += burst_table(burst, burst_pods, quick)
    nf = len(foreign["a1empty"])
    emit(f"{FOREIGN_ROUTES} foreign routes in the node's table {HOST_TABLE} vs an empty table, ADD in ms "
         f"({nf} rounds, condition order alternated):")
    emit("")
    emit("| quantity | empty | 5,000 routes | ratio full/empty (per round) | p10 | p90 |")
    emit("|---|---:|---:|---:|---:|---:|")
    r_for: dict[str, list[float]] = {}
    for key, title in (("a1", "a one NIC ADD"), ("c1", "c one NIC ADD"), ("a8", "a 8-rail pod ADD"),
                       ("d8", "d 8-rail pod ADD")):
        r_for[key] = ratio(foreign[f"{key}full"], foreign[f"{key}empty"])
        med, lo, hi = summary(r_for[key])
        emit(f"| {title} | {statistics.median(foreign[f'{key}empty']):.1f} | "
             f"{statistics.median(foreign[f'{key}full']):.1f} | {med:.2f} | {lo:.2f} | {hi:.2f} |")
    for key, base, title in (("c1", "a1", "c-a increment, one NIC"), ("d8", "a8", "d-a increment, 8-rail pod")):
        full = [f - a for f, a in zip(foreign[f"{key}full"], foreign[f"{base}full"])]
        empty = [e - a for e, a in zip(foreign[f"{key}empty"], foreign[f"{base}empty"])]
        r_for[f"{key}inc"] = ratio(full, empty)
        med, lo, hi = summary(r_for[f"{key}inc"])
        emit(f"| {title} | {statistics.median(empty):.1f} | {statistics.median(full):.1f} | "
             f"{med:.2f} | {lo:.2f} | {hi:.2f} |")
    emit("")
    emit("Server memory across requests (route-tune ADD/DEL pairs of net1 sent to the socket by the "
         "shim's client; the count includes the earlier phases' requests), MiB:")
    emit("")
    emit("| requests served | VmRSS | VmHWM |")
    emit("|---:|---:|---:|")
    for count, rss, hwm in mem_series:
        emit(f"| {count} | {rss:.1f} | {hwm:.1f} |")
    emit("")

    out += version_table(ver)

    # ---------------------------------------------------------------- goals
    emit("Goals of issue 13, as ratios to sbr in this run (medians of the per-round ratios):")
    emit("")
    verdicts = Verdicts(emit)
    med = {v: {key: statistics.median(s[v][key]) for key in s[v]} for v in VARIANTS}

    def ratio_of_medians_inc(v: str) -> float:
        b_inc = med["b"]["add1"] - med["a"]["add1"]
        return (med[v]["add1"] - med["a"]["add1"]) / b_inc if b_inc > 0 else float("inf")

    verdicts.goal("resident increment per NIC, one NIC ADD, (d-a)/(b-a)", statistics.median(r_res),
                  GOAL_RESIDENT_INC, kind="warm", alt=ratio_of_medians_inc("d"))
    verdicts.info("cross-check, per NIC of the 8-rail pod ADD", statistics.median(r_res8))
    verdicts.goal("in-process increment per NIC, one NIC ADD, (c-a)/(b-a)", statistics.median(r_inp),
                  GOAL_INPROC_INC, kind="cold", alt=ratio_of_medians_inc("c"))
    verdicts.info("cross-check, per NIC of the 8-rail pod ADD", statistics.median(r_inp8))
    verdicts.goal("VERSION start-up, route-tune/sbr", statistics.median(ratio(ver["route-tune"], ver["sbr"])),
                  GOAL_VERSION, kind="version",
                  alt=statistics.median(ver["route-tune"]) / statistics.median(ver["sbr"]))
    burst_name = f"burst {burst_pods} pods x 8 rails" + (" (QUICK: the goal is for 16 pods)" if quick else "")
    verdicts.goal(f"{burst_name}, resident ADD wall time, d/b",
                  statistics.median(ratio(burst["d"]["add"], burst["b"]["add"])), GOAL_BURST, kind="warm",
                  alt=statistics.median(burst["d"]["add"]) / statistics.median(burst["b"]["add"]))
    verdicts.info("the same burst's DEL, d/b", statistics.median(ratio(burst["d"]["del"], burst["b"]["del"])),
                  note=f"no goal; {GOAL_BURST:g}x would be ADD's")
    verdicts.info("resident 8-rail pod ADD, d/b", statistics.median(r_pod),
                  note=f"no goal; issue 7's was <= {OLD_GOAL_RESIDENT_POD:g}x")
    verdicts.goal("5,000 foreign routes, resident 8-rail pod ADD full/empty", statistics.median(r_for["d8"]),
                  GOAL_FOREIGN, kind="foreign")
    verdicts.goal("5,000 foreign routes, in-process one NIC ADD full/empty", statistics.median(r_for["c1"]),
                  GOAL_FOREIGN, kind="foreign")
    verdicts.goal(f"server VmRSS after {mem_series[-1][0]} requests", mem_series[-1][1], GOAL_RSS_MIB,
                  unit=" MiB")
    growth = mem_series[-1][1] - mem_series[1][1]
    verdicts.goal(f"server VmRSS flat: growth from {mem_series[1][0]} to {mem_series[-1][0]} requests", growth,
                  FLAT_MIB, unit=" MiB")
    for v, process, kind in (("c", "route-tune in-process plugin", "cold"), ("d", "route-tune native forwarder",
                                                                              "warm")):
        peak_mib = max(peak.get((v, "route-tune", c), 0) for c in ("ADD", "DEL")) / 1024
        verdicts.goal(f"peak RSS of the {process} (max of ADD, DEL; wrapper floor {floor:.1f} MiB included)",
                      peak_mib, COORDINATOR_PEAK_RSS_MIB, unit=" MiB", kind=kind, strict=True,
                      note=", the coordinator's")
    if quick:
        emit("- (QUICK smoke: few rounds, 4 burst pods, 1,000 requests; bench/README.md quotes a full run)")
    emit("")
    phases.append(("end", time.monotonic()))
    emit("Phase times: " + ", ".join(f"{name.split(':')[0]} {t2 - t1:.0f} s"
                                     for (name, t1), (_, t2) in zip(phases, phases[1:])))
    return out, verdicts.misses
