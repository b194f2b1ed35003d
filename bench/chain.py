"""The issue-13 benchmark: route-tune in a real libcni chain, against Debian's sbr.

Run (root):   .venv/bin/python bench/chain.py [--rounds 20] [--quick] [--profile]

It builds the 8-rail namespace lab (tag ``rtK``, docs/lab.md) plus 16 extra Calico-style pods
for the burst, then runs everything INSIDE the lab's node namespace, where a kubelet would run
the runtime: every chain step is one run of the Go libcni runner (``cnirunner``, libcni 1.1.2)
on rail K's conflist, timed by wall clock from spawn to exit (the runner itself, so libcni's
cache/prevResult work and every plugin process of the step are included).

Variants (the same rail conflist with a different last plugin):
  a  [macvlan+host-local]           b  a + Debian sbr
  c  a + route-tune, ROUTE_TUNE_ENGINE=inprocess (the native forwarder execs python -I -S)
  d  a + route-tune, ROUTE_TUNE_ENGINE=resident (the native forwarder hands the request to a
     ``cni-route-tune serve`` started in the node ns)

Phases, each interleaved (A B C D A B C D ...) so that background load hits all variants alike:
  1. per round: one NIC (net1) ADD then DEL, for a, b, c, d; then the whole 8-rail pod ADD
     (net1..net8, in series, as a runtime does) then DEL (net8..net1), for a, b, c, d.
     Ratios are computed within each round, then summarised (median, p10, p90).
  2. peak RSS: one extra round with every plugin run through a wrapper that records its
     child's ru_maxrss (os.wait4); the server's VmHWM/VmRSS from /proc.
  3. burst: 16 pods x 8 rails started at once (pods concurrent, each pod's rails in series),
     wall time until all are done, for b, c, d; per-round d/b.
  4. 5,000 foreign routes in the node's hostRuleTable (500) vs none: 8-rail pod ADD of a, d, c.
  5. server RSS across 10,000 requests (route-tune ADD/DEL pairs of net1 sent straight to the
     socket through the shim's own client), sampled every 1,000.
  6. VERSION start-up: CNI_COMMAND=VERSION of sbr and route-tune (and /bin/true as a floor),
     spawn to exit, many interleaved runs per round; per-round route-tune/sbr.
Then the goal verdicts of issue 13, and for each missed goal a profile (bench/_profile.py).

Nothing outside the namespaces it creates is touched; they are removed at the end (also on ^C).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _spawn import Spawner, compile_c

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BIN = REPO / ".venv" / "bin"
PY = BIN / "python"
TAG = "rtK"
VARIANTS = "abcd"
LABEL = {"a": "a [macvlan, host-local]", "b": "b + sbr", "c": "c + route-tune in-process",
         "d": "d + route-tune resident"}
RAILS = range(1, 9)
POD_CID = "rtk-bench-pod"
BURST_PODS = 16
#: One-NIC ADD/DEL repetitions of a, b and d per round (c once; see Bench.phase_rounds).
NIC_REPS = 5
FOREIGN_ROUTES = 5000
HOST_TABLE = 500
SBR = "/usr/lib/cni/sbr"
#: VERSION runs per process per round (interleaved true, sbr, route-tune; see Bench.phase_version).
VERSION_REPS = 20
#: What libcni (1.1.2) writes to a plugin's stdin for VERSION.
VERSION_STDIN = b'{"cniVersion":"1.0.0"}'
#: Goals of issue 13, as ratios to sbr measured in the same run (issue 7's are replaced).
GOAL_RESIDENT_INC = 2.5   # (d-a)/(b-a), one NIC ADD: half of the coordinator's 4.9-5.1x
GOAL_INPROC_INC = 12.0    # (c-a)/(b-a), one NIC ADD: about 2.5x the coordinator's
GOAL_VERSION = 6.0        # VERSION start-up route-tune/sbr: no slower than the coordinator (18-19 ms vs 3.0)
GOAL_BURST = 1.5          # burst 16 pods x 8 rails, resident ADD wall time d/b
GOAL_FOREIGN = 1.2        # 5,000 foreign routes: ADD full/empty
GOAL_RSS_MIB, FLAT_MIB = 80.0, 2.0  # server VmRSS after 10,000 requests, and its growth
#: Peak RSS of the real coordinator's plugin process, measured in issue 13's side-by-side run
#: (MiB); every route-tune plugin process must stay below it.
COORDINATOR_PEAK_RSS_MIB = 27.5
#: Issue 7's pod goal, still printed for comparison (no longer a goal).
OLD_GOAL_RESIDENT_POD = 2.0


WRAPPER_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
static const char *names[] = {@NAMES@};
static const char *reals[] = {@REALS@};
int main(int argc, char **argv, char **envp) {
    const char *base = strrchr(argv[0], '/');
    base = base ? base + 1 : argv[0];
    const char *real = NULL;
    for (int i = 0; i < @N@; i++)
        if (strcmp(base, names[i]) == 0) real = reals[i];
    if (!real) return 127;
    pid_t pid = vfork();
    if (pid == 0) {
        argv[0] = (char *)real;
        execve(real, argv, envp);
        _exit(127);
    }
    int status;
    struct rusage ru;
    if (pid < 0 || wait4(pid, &status, 0, &ru) < 0) return 127;
    const char *v = getenv("RTK_VARIANT"), *c = getenv("CNI_COMMAND"), *f = getenv("CNI_IFNAME");
    int fd = open(@LOG@, O_WRONLY | O_APPEND | O_CREAT, 0600);
    dprintf(fd, "%s %s %s %s %ld\n", base, v ? v : "?", c ? c : "?", f ? f : "?", ru.ru_maxrss);
    close(fd);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
"""


# ================================================================================================
# outer: root namespace side (build / tear down namespaces only)


def burst_pod(prefix: str, i: int) -> tuple[str, str, str]:
    """(namespace, node-side veth, pod IPv4) of burst pod i."""
    return f"{prefix}-bp{i}", f"cali{prefix}b{i:x}", f"10.233.119.{180 + i}"


def lab_names():
    """This run's lab names (rtK<pid>x<n>); leftovers of dead runs are removed first."""
    from cniplugin.lab.sessions import LabNames
    names = LabNames(TAG)
    names.cleanup_stale()
    return names


def build_burst_pods(lab, prefix: str) -> None:
    """16 more pods, each with a Calico-style eth0 (veth to the node, /32, 169.254.1.1 default)."""
    from cniplugin.lab.topology import CALI_MAC, HIJACK_GW4, ip_batch, run
    pods = [burst_pod(prefix, i) for i in range(BURST_PODS)]
    ip_batch([f"netns add {ns}" for ns, _, _ in pods])
    node, sysctls = [], []
    for ns, cali, ip4 in pods:
        run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0")
        node += [f"link add {cali} address {CALI_MAC} type veth peer name eth0 netns {ns}",
                 f"link set {cali} up", f"route add {ip4}/32 dev {cali} scope link"]
        sysctls += [f"net.ipv4.conf.{cali}.proxy_arp=1", f"net.ipv4.neigh.{cali}.proxy_delay=0"]
    ip_batch(node, lab.node)
    run("ip", "netns", "exec", lab.node, "sysctl", "-qw", *sysctls)
    for ns, _, ip4 in pods:
        ip_batch(["link set lo up", "link set eth0 up", f"addr add {ip4}/32 dev eth0",
                  f"route add {HIJACK_GW4} dev eth0 scope link", f"route add default via {HIJACK_GW4} dev eth0"], ns)


def outer(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("chain.py needs root (network namespaces)", file=sys.stderr)
        return 2
    from cniplugin.lab.runtime import PluginEnv, build_cnirunner
    from cniplugin.lab.topology import OverlayLab
    runner = build_cnirunner()
    prefix = lab_names().next()
    lab = OverlayLab(prefix, rails=8, family="4")
    inner_proc: subprocess.Popen | None = None

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    with lab:
        try:
            build_burst_pods(lab, prefix)
            penv = PluginEnv(lab.tmp / "penv", family="4")
            cfg = {"prefix": prefix, "node": lab.node, "pod": lab.pod, "pod_netns": lab.pod_netns,
                   "runner": str(runner), "workdir": str(penv.workdir), "cni_path": penv.cni_path,
                   "defaults": str(penv.defaults_file), "ipam": str(penv.ipam_dir),
                   "cache": str(penv.cache_dir), "args": vars(args)}
            cfg_file = lab.tmp / "bench.json"
            cfg_file.write_text(json.dumps(cfg))
            print(f"lab {prefix}: node, pod, 8 rails, {BURST_PODS} burst pods built in "
                  f"{time.monotonic() - t0:.1f} s; running inside {lab.node}", flush=True)
            inner_proc = subprocess.Popen(["ip", "netns", "exec", lab.node, sys.executable,
                                           str(Path(__file__).resolve()), "--inner", str(cfg_file)])
            return inner_proc.wait()
        except KeyboardInterrupt:
            if inner_proc and inner_proc.poll() is None:
                inner_proc.terminate()
                inner_proc.wait()
            print("interrupted; lab removed", file=sys.stderr)
            return 130


# ================================================================================================
# inner: runs inside the node namespace


def q(values: list[float], p: float) -> float:
    """The p-quantile (inclusive method) of values."""
    if len(values) == 1:
        return values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[int(round(p * 100)) - 1]


def summary(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), q(values, 0.10), q(values, 0.90)


class StepFailed(RuntimeError):
    pass


class Chain:
    """Runs the libcni runner on conflist files; times each run (spawn to exit) with wait4."""

    def __init__(self, cfg: dict, runner_env: dict[str, dict[str, str]]) -> None:
        self.cfg, self.env = cfg, runner_env
        self.spawner = Spawner()

    def run(self, command: str, conflist: Path, variant: str, *, netns: str, ifname: str,
            cid: str, env_key: str | None = None) -> tuple[float, bytes]:
        """(wall ms, stdout); raises StepFailed."""
        argv = [self.cfg["runner"], command, "-conflist", str(conflist), "-netns", netns,
                "-ifname", ifname, "-id", cid, "-cache", self.cfg["cache"]]
        run = self.spawner.run(argv, self.env[env_key or variant])
        if run.exit_code != 0:
            raise StepFailed(f"{variant} {command} {ifname} ({cid}) failed: {run.stdout.decode(errors='replace')} "
                             f"{run.stderr.decode(errors='replace')[-2000:]}")
        return run.ms, run.stdout


class Bench:
    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.args = argparse.Namespace(**cfg["args"])
        self.quick = self.args.quick
        self.work = Path(cfg["workdir"])
        self.sock = str(self.work / "engine" / "engine.sock")
        self.server: subprocess.Popen | None = None
        self.requests_served = 0
        base = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                "CNI_PATH": cfg["cni_path"], "ROUTE_TUNE_DEFAULTS": cfg["defaults"]}
        self.base_env = base
        env = {"a": dict(base), "b": dict(base),
               "c": {**base, "ROUTE_TUNE_ENGINE": "inprocess"},
               "d": {**base, "ROUTE_TUNE_ENGINE": "resident", "ROUTE_TUNE_SOCKET": self.sock}}
        self.wrap_dir = self.work / "rsswrap"
        self.rss_log = self.work / "rss.log"
        for v in VARIANTS:  # the same variants with every plugin behind the RSS wrapper
            env[f"rss-{v}"] = {**env[v], "CNI_PATH": f"{self.wrap_dir}:{cfg['cni_path']}"}
        self.chain = Chain(cfg, env)
        self.conf = self._write_conflists()
        #: the lab's route-tune: a link in its CNI bin dir to the venv's native forwarder
        self.route_tune = Path(cfg["cni_path"].split(":")[0]) / "route-tune"

    # -- set-up ------------------------------------------------------------------------------
    def _write_conflists(self) -> dict[tuple[str, int], Path]:
        from cniplugin.lab.runtime import rail_conflist
        chained = {"a": None, "b": "sbr", "c": "route-tune", "d": "route-tune"}
        out = {}
        for v in VARIANTS:
            d = self.work / "conf" / v
            d.mkdir(parents=True, exist_ok=True)
            for k in RAILS:
                conf = rail_conflist(k, "4", data_dir=self.cfg["ipam"], chained=chained[v])
                out[(v, k)] = d / f"rail{k}.conflist"
                out[(v, k)].write_text(json.dumps(conf))
                # burst: 16 pods share each rail; a wider range in its own IPAM dir (.100-.199)
                burst = rail_conflist(k, "4", data_dir=str(self.work / "ipam-burst"), chained=chained[v])
                rng = burst["plugins"][0]["ipam"]["ranges"][0][0]
                rng["rangeStart"], rng["rangeEnd"] = f"172.16.1{k}.100", f"172.16.1{k}.199"
                out[(f"burst-{v}", k)] = d / f"burst-rail{k}.conflist"
                out[(f"burst-{v}", k)].write_text(json.dumps(burst))
        return out

    def _write_wrappers(self) -> None:
        """Per plugin type a wrapper that runs the real plugin and logs its ru_maxrss.

        A static C program (vfork + execve + wait4): a child's ru_maxrss also counts the memory
        of the process image it replaced at exec, so the wrapper must be tiny; its floor is
        measured by wrapping /bin/true and printed.  macvlan's figure includes its host-local
        child (a waited-for descendant; host-local is found on CNI_PATH behind the wrapper dir).
        """
        self.wrap_dir.mkdir(exist_ok=True)
        table = {"macvlan": "/usr/lib/cni/macvlan", "sbr": SBR, "true": "/bin/true",
                 "route-tune": str(self.route_tune)}
        names = ", ".join(json.dumps(n) for n in table)
        reals = ", ".join(json.dumps(r) for r in table.values())
        compile_c(WRAPPER_C.replace("@NAMES@", names).replace("@REALS@", reals)
                  .replace("@LOG@", json.dumps(str(self.rss_log))).replace("@N@", str(len(table))),
                  self.wrap_dir / "rsswrap")
        for name in table:
            (self.wrap_dir / name).unlink(missing_ok=True)
            (self.wrap_dir / name).symlink_to("rsswrap")

    def start_server(self) -> None:
        os.makedirs(os.path.dirname(self.sock), mode=0o700, exist_ok=True)
        log = open(self.work / "server.log", "ab")
        env = {**self.base_env, "ROUTE_TUNE_LOG_STDERR_LEVEL": "warning"}
        self.server = subprocess.Popen([str(BIN / "cni-route-tune"), "serve", "--socket", self.sock],
                                       env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.sock):
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {(self.work / 'server.log').read_text()[-2000:]}")
            time.sleep(0.02)

    def stop_server(self) -> None:
        if self.server and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(20)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()

    def server_mem(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) of the server in MiB."""
        fields = {}
        for line in Path(f"/proc/{self.server.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    # -- steps ---------------------------------------------------------------------------------
    def step(self, command: str, v: str, k: int, *, env_key: str | None = None, cid: str = POD_CID,
             netns: str | None = None, conf_v: str | None = None) -> float:
        ms, _ = self.chain.run(command, self.conf[(conf_v or v, k)], v, env_key=env_key, cid=cid,
                               netns=self.cfg["pod_netns"] if netns is None else netns, ifname=f"net{k}")
        if v == "d":
            self.requests_served += 1
        return ms

    def one_nic(self, v: str, env_key: str | None = None) -> tuple[float, float]:
        return self.step("add", v, 1, env_key=env_key), self.step("del", v, 1, env_key=env_key)

    def pod(self, v: str, env_key: str | None = None) -> tuple[float, float]:
        add = sum(self.step("add", v, k, env_key=env_key) for k in RAILS)
        dele = sum(self.step("del", v, k, env_key=env_key) for k in reversed(RAILS))
        return add, dele

    # -- sanity: the variants really do their work and DEL leaves the pod clean -------------
    def sanity(self, rails: range = range(1, 3)) -> None:
        from cniplugin.lab.topology import OverlayLab, state_diff
        lab = OverlayLab.__new__(OverlayLab)  # only the inspection helpers (no build)
        pod, node = self.cfg["pod"], self.cfg["node"]
        before = (lab.state(pod), lab.state(node))
        for v in VARIANTS:
            for k in rails:
                self.step("add", v, k)
            rules = [r for r in lab.state(pod)["rules4"] if r.get("priority") == 31000]
            want = len(rails) + 1 if v in "cd" else 0  # eth0's reply rule + one per rail
            if len(rules) != want:
                raise RuntimeError(f"sanity: variant {v} left {len(rules)} pref-31000 rules, want {want}")
            for k in reversed(rails):
                self.step("del", v, k)
            diff = state_diff(before[0], lab.state(pod)) + state_diff(before[1], lab.state(node))
            if diff:
                raise RuntimeError(f"sanity: variant {v}: pod/node not clean after DEL:\n{diff}")

    # -- phases --------------------------------------------------------------------------------
    def phase_rounds(self, rounds: int, reps: int) -> dict[str, dict[str, list[float]]]:
        """Per round: one NIC ADD+DEL (a, b, d `reps` times, c once: A B C D A B D ...; the round's
        value is the median of its reps, which steadies the small b-a), then the 8-rail pod
        ADD+DEL of A B C D.  Round 0 warms the caches and is dropped."""
        s: dict[str, dict[str, list[float]]] = {v: {"add1": [], "del1": [], "add8": [], "del8": []} for v in VARIANTS}
        for r in range(rounds + 1):
            nic: dict[str, tuple[list[float], list[float]]] = {v: ([], []) for v in VARIANTS}
            for rep in range(reps):
                for v in VARIANTS:
                    if v == "c" and rep:
                        continue  # c-a is hundreds of ms: noise does not matter there
                    add, dele = self.one_nic(v)
                    nic[v][0].append(add)
                    nic[v][1].append(dele)
            row: dict[str, dict[str, float]] = {v: {"add1": statistics.median(nic[v][0]),
                                                    "del1": statistics.median(nic[v][1])} for v in VARIANTS}
            for v in VARIANTS:
                row[v]["add8"], row[v]["del8"] = self.pod(v)
            if r:
                for v in VARIANTS:
                    for key, value in row[v].items():
                        s[v][key].append(value)
            if r % 5 == 0 or r == rounds:
                print(f"  round {r}/{rounds}: one NIC ADD " +
                      " ".join(f"{v}={row[v]['add1']:.1f}" for v in VARIANTS) + " ms; pod ADD " +
                      " ".join(f"{v}={row[v]['add8']:.0f}" for v in VARIANTS) + " ms", flush=True)
        return s

    def phase_rss(self) -> dict[tuple[str, str, str], int]:
        self._write_wrappers()
        self.rss_log.write_text("")
        for command in ("ADD", "DEL"):  # the wrapper's own floor, included in every figure
            subprocess.run([str(self.wrap_dir / "true")], check=True,
                           env={"RTK_VARIANT": "floor", "CNI_COMMAND": command, "CNI_IFNAME": "-"})
        for v in VARIANTS:
            self.chain.env[f"rss-{v}"]["RTK_VARIANT"] = v
            self.one_nic(v, env_key=f"rss-{v}")
            self.pod(v, env_key=f"rss-{v}")
        peak: dict[tuple[str, str, str], int] = {}
        for line in self.rss_log.read_text().splitlines():
            name, v, command, _, kib = line.split()
            key = (v, name, command)
            peak[key] = max(peak.get(key, 0), int(kib))
        return peak

    def phase_burst(self, rounds: int, pods_n: int, c_rounds: int = 1) -> dict[str, dict[str, list[float]]]:
        """`pods_n` pods x 8 rails ADDed at once, then DELed at once; wall time to all done.

        Rounds interleave b, c, d.  The in-process variant (c) costs a minute or more per burst on a
        2-core VM, so it runs `c_rounds` times and its pods are then removed through the resident
        engine (same conflist; the DEL is not timed for c).
        """
        pods = [burst_pod(self.cfg["prefix"], i) for i in range(pods_n)]
        out: dict[str, dict[str, list[float]]] = {v: {"add": [], "del": []} for v in "bcd"}

        def one(v: str, command: str, i: int) -> None:
            ns, _, _ = pods[i]
            order = RAILS if command == "add" else reversed(RAILS)
            for k in order:
                self.step(command, v, k, cid=f"rtk-burst-{i}", netns=f"/run/netns/{ns}", conf_v=f"burst-{v}")

        def burst(v: str, command: str) -> float:
            start = time.perf_counter()
            futures = [pool.submit(one, v, command, i) for i in range(pods_n)]
            errors = [f.exception() for f in futures]
            elapsed = (time.perf_counter() - start) * 1000
            if any(errors):
                raise next(e for e in errors if e)
            return elapsed

        with ThreadPoolExecutor(pods_n) as pool:
            for r in range(rounds):
                for v in "bcd":
                    if v == "c" and r >= c_rounds:
                        continue
                    out[v]["add"].append(burst(v, "add"))
                    if v == "c":
                        burst("d", "del")  # undo through the resident engine (untimed)
                    else:
                        out[v]["del"].append(burst(v, "del"))
                print(f"  burst round {r + 1}/{rounds}: ADD " +
                      " ".join(f"{v}={out[v]['add'][-1] / 1000:.2f}s" for v in "bcd" if out[v]["add"]), flush=True)
        return out

    def _foreign(self, fill: bool) -> None:
        from cniplugin.lab.topology import ip_batch
        if fill:
            ip_batch([f"route add 10.{200 + i // 65536}.{i // 256 % 256}.{i % 256}/32 dev uplink table {HOST_TABLE}"
                      for i in range(FOREIGN_ROUTES)], self.cfg["node"])
        else:
            ip_batch([f"route flush table {HOST_TABLE} proto boot"], self.cfg["node"])
        count = len(subprocess.run(["ip", "route", "show", "table", str(HOST_TABLE)], capture_output=True,
                                   text=True, check=True).stdout.splitlines())
        if count != (FOREIGN_ROUTES if fill else 0):
            raise RuntimeError(f"table {HOST_TABLE} holds {count} routes (fill={fill})")

    def phase_foreign(self, rounds: int) -> dict[str, list[float]]:
        """ADD cost with 5,000 foreign routes in table 500 vs none: a and d as 8-rail pods (sum of
        the 8 steps), a and c as one NIC (c's in-process pod would cost ~10 s per sample)."""
        out: dict[str, list[float]] = {f"{key}{cond}": [] for key in ("a1", "c1", "a8", "d8")
                                       for cond in ("empty", "full")}
        for r in range(rounds + 1):  # round 0 is a warm-up
            order = ("empty", "full") if r % 2 == 0 else ("full", "empty")  # alternate: no drift bias
            row = {}
            for cond in order:
                self._foreign(cond == "full")
                row[f"a1{cond}"] = self.one_nic("a")[0]
                row[f"c1{cond}"] = self.one_nic("c")[0]
                row[f"a8{cond}"] = self.pod("a")[0]
                row[f"d8{cond}"] = self.pod("d")[0]
                if cond == "full":
                    self._foreign(False)
            if r:
                for key, value in row.items():
                    out[key].append(value)
        return out

    def phase_requests(self, total: int, every: int) -> list[tuple[int, float, float]]:
        """ADD/DEL pairs of route-tune alone for net1, straight to the socket via the shim client."""
        from cniplugin.transport import shim as _shim
        conf = json.loads(self.conf[("d", 1)].read_text())
        # net1 from [macvlan, host-local]; route-tune then gets that result as prevResult (as libcni would)
        _, result = self.chain.run("add", self.conf[("a", 1)], "a", netns=self.cfg["pod_netns"],
                                   ifname="net1", cid=POD_CID)
        plugin = {**conf["plugins"][-1], "name": conf["name"], "cniVersion": conf["cniVersion"],
                  "prevResult": json.loads(result)}
        stdin = json.dumps(plugin).encode()
        env = {**self.chain.env["d"], "CNI_CONTAINERID": POD_CID, "CNI_NETNS": self.cfg["pod_netns"],
               "CNI_IFNAME": "net1", "CNI_ARGS": ""}
        samples = [(self.requests_served, *self.server_mem())]
        try:
            for n in range(1, total // 2 + 1):
                for command in ("ADD", "DEL"):
                    code, out, _ = _shim.forward({**env, "CNI_COMMAND": command}, stdin)
                    if code != 0:
                        raise RuntimeError(f"{command} via socket failed: {out!r}")
                self.requests_served += 2
                if (2 * n) % every == 0:
                    samples.append((self.requests_served, *self.server_mem()))
        finally:
            self.chain.run("del", self.conf[("a", 1)], "a", netns=self.cfg["pod_netns"], ifname="net1",
                           cid=POD_CID)
        return samples

    def phase_version(self, rounds: int, reps: int) -> dict[str, list[float]]:
        """Start-up: CNI_COMMAND=VERSION (libcni's stdin) of sbr and route-tune, /bin/true as a floor.

        Per round each runs `reps` times, interleaved (T S R T S R ...), and the round's value is
        each one's median.  Round 0 warms the page cache and is dropped."""
        env = {**self.chain.env["d"], "CNI_COMMAND": "VERSION"}
        procs = {"true": ["/bin/true"], "sbr": [SBR], "route-tune": [str(self.route_tune)]}

        def run(name: str) -> float:
            done = self.chain.spawner.run(procs[name], env, VERSION_STDIN)
            if done.exit_code != 0 or (name != "true" and b"supportedVersions" not in done.stdout):
                raise RuntimeError(f"VERSION of {name} failed: {done.stdout!r} {done.stderr[-2000:]!r}")
            return done.ms

        out: dict[str, list[float]] = {name: [] for name in procs}
        for r in range(rounds + 1):
            walls: dict[str, list[float]] = {name: [] for name in procs}
            for _ in range(reps):
                for name in procs:
                    walls[name].append(run(name))
            if r:
                for name in procs:
                    out[name].append(statistics.median(walls[name]))
        return out

    # -- profile ---------------------------------------------------------------------------------
    def profile(self, kinds: list[str]) -> None:
        """Profile what a missed goal pays for (bench/_profile.py, in this node namespace)."""
        conf = json.loads(self.conf[("c", 1)].read_text())
        _, result = self.chain.run("add", self.conf[("a", 1)], "a", netns=self.cfg["pod_netns"],
                                   ifname="net1", cid=POD_CID)
        try:
            plugin = {**conf["plugins"][-1], "name": conf["name"], "cniVersion": conf["cniVersion"],
                      "prevResult": json.loads(result)}
            stdin_file = self.work / "profile-stdin.json"
            stdin_file.write_text(json.dumps(plugin))
            env = {**self.base_env, "CNI_CONTAINERID": POD_CID, "CNI_NETNS": self.cfg["pod_netns"],
                   "CNI_IFNAME": "net1", "CNI_ARGS": "", "ROUTE_TUNE_SOCKET": self.sock}
            env_file = self.work / "profile-env.json"
            env_file.write_text(json.dumps(env))
            for kind in kinds:
                if kind == "foreign":
                    self._foreign(True)
                try:
                    subprocess.run([str(PY), str(REPO / "bench" / "_profile.py"), kind if kind != "foreign" else "warm",
                                    "--env", str(env_file), "--stdin", str(stdin_file),
                                    "--title", {"foreign": "warm engine with 5,000 foreign routes in table 500"}
                                    .get(kind, "")], check=False)
                finally:
                    if kind == "foreign":
                        self._foreign(False)
        finally:
            self.chain.run("del", self.conf[("a", 1)], "a", netns=self.cfg["pod_netns"], ifname="net1",
                           cid=POD_CID)


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


def mount_state_tmpfs(cfg: dict) -> str:
    """Put stateDir on a tmpfs, as on a real node (default stateDir /run/route-tune; /run is a
    tmpfs under systemd).  This VM's /run and /tmp are ext4, where every fsync of the
    write-ahead state costs milliseconds.  The mount lives in the private mount namespace that
    `ip netns exec` gave this process, so the root namespace never sees it."""
    state = json.loads(Path(cfg["defaults"]).read_text())["stateDir"]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", f"{TAG}-state", state], check=True)
    return state


def inner(cfg_file: str) -> int:
    # SIGTERM from the outer process (^C, kill): unwind so that the server is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cfg = json.loads(Path(cfg_file).read_text())
    bench = Bench(cfg)
    quick, profile_always = bench.args.quick, bench.args.profile
    rounds = bench.args.rounds or (3 if quick else 20)
    burst_rounds, burst_pods = (1, 4) if quick else (3, BURST_PODS)
    foreign_rounds = 1 if quick else 6
    total_req, every = (1000, 100) if quick else (10000, 1000)
    state_fs = "ext4 (--state-on-disk)" if bench.args.state_on_disk else "tmpfs"
    if not bench.args.state_on_disk:
        mount_state_tmpfs(cfg)
    started = time.monotonic()
    loads = [os.getloadavg()[0]]  # 1-minute load average at the start of each phase, and at the end
    phases: list[tuple[str, float]] = []
    out: list[str] = []
    emit = out.append

    def phase(name: str) -> None:
        phases.append((name, time.monotonic()))
        loads.append(os.getloadavg()[0])
        print(f"[{time.monotonic() - started:6.1f} s] {name} (load {loads[-1]:.1f})", flush=True)

    try:
        phase("server start")
        bench.start_server()
        mem_start = bench.server_mem()
        phase("sanity check (each variant's pod ADD does its work, DEL restores pod and node)")
        bench.sanity()
        phase(f"phase 1: {rounds} interleaved rounds (+1 warm-up), one-NIC reps {NIC_REPS}")
        s = bench.phase_rounds(rounds, NIC_REPS)
        mem_rounds = bench.server_mem()
        phase("phase 2: peak RSS (wrapped plugins)")
        peak = bench.phase_rss()
        phase(f"phase 3: burst {burst_pods} pods x 8 rails, {burst_rounds} round(s)")
        burst = bench.phase_burst(burst_rounds, burst_pods)
        mem_burst = bench.server_mem()
        phase(f"phase 4: {FOREIGN_ROUTES} foreign routes in table {HOST_TABLE}, {foreign_rounds} rounds (+1 warm-up)")
        foreign = bench.phase_foreign(foreign_rounds)
        phase(f"phase 5: {total_req} requests to the server")
        mem_series = bench.phase_requests(total_req, every)
        phase(f"phase 6: VERSION start-up, {rounds} rounds (+1 warm-up) x {VERSION_REPS} runs per process")
        ver = bench.phase_version(rounds, VERSION_REPS)
        phase("report")
        elapsed = time.monotonic() - started

        # ---------------------------------------------------------------- the report
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
            emit("- (QUICK smoke: few rounds, 4 burst pods, 1,000 requests; the README quotes a full run)")
        emit("")
        phases.append(("end", time.monotonic()))
        emit("Phase times: " + ", ".join(f"{name.split(':')[0]} {t2 - t1:.0f} s"
                                         for (name, t1), (_, t2) in zip(phases, phases[1:])))
        print("\n" + "\n".join(out), flush=True)
        kinds = ["cold", "warm", "version", "foreign"] if profile_always else verdicts.misses
        if kinds:
            print(f"\n## Profiles of the missed goals ({', '.join(kinds)}), in the node netns, net1 attached\n", flush=True)
            bench.profile(kinds)
        return 0
    finally:
        bench.stop_server()


def ratio(xs: list[float], ys: list[float]) -> list[float]:
    """Per-round ratios; a denominator <= 0 (noise swamped the baseline) gives inf."""
    return [x / y if y > 0 else float("inf") for x, y in zip(xs, ys)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 20; --quick 5)")
    parser.add_argument("--quick", action="store_true", help="a ~2-minute smoke run")
    parser.add_argument("--profile", action="store_true", help="profile even when every goal is met")
    parser.add_argument("--state-on-disk", action="store_true",
                        help="keep stateDir on the lab's disk directory instead of a private tmpfs")
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        return inner(args.inner)
    args_dict = vars(args)
    args_dict.pop("inner")
    return outer(argparse.Namespace(**args_dict))


if __name__ == "__main__":
    sys.exit(main())
