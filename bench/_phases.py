"""bench/chain.py's measuring side: the libcni chain steps and the six phases, run inside the lab's
node namespace (see chain.py's docstring for what each phase does and why)."""

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

from _spawn import Spawner, compile_c, start_serve

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BIN = REPO / ".venv" / "bin"
PY = BIN / "python"
TAG = "rtK"
VARIANTS = "abcd"
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


def burst_pod(prefix: str, i: int) -> tuple[str, str, str]:
    """(namespace, node-side veth, pod IPv4) of burst pod i. The veth lives in the lab's own node
    netns, so its name needs to be unique only there (and stay within 15 characters)."""
    return f"{prefix}-bp{i}", f"calibp{i:02x}", f"10.233.119.{180 + i}"


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
        env = {**self.base_env, "ROUTE_TUNE_LOG_STDERR_LEVEL": "warning"}
        self.server = start_serve(BIN / "cni-route-tune", self.sock, "--metrics-address", "127.0.0.1:9731",
                                  env=env, log=self.work / "server.log")

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
        from cniplugin.lab.topology import namespace_state, state_diff
        pod, node = self.cfg["pod"], self.cfg["node"]
        before = (namespace_state(pod), namespace_state(node))
        for v in VARIANTS:
            for k in rails:
                self.step("add", v, k)
            rules = [r for r in namespace_state(pod)["rules4"] if r.get("priority") == 31000]
            want = len(rails) + 1 if v in "cd" else 0  # eth0's reply rule + one per rail
            if len(rules) != want:
                raise RuntimeError(f"sanity: variant {v} left {len(rules)} pref-31000 rules, want {want}")
            for k in reversed(rails):
                self.step("del", v, k)
            diff = state_diff(before[0], namespace_state(pod)) + state_diff(before[1], namespace_state(node))
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
                        continue  # c-a dwarfs the scheduling noise: one run is enough
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

        Rounds interleave b, c, d.  The in-process variant (c) costs far more per burst than the others,
        so it runs `c_rounds` times and its pods are then removed through the resident
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
        the 8 steps), a and c as one NIC (c's in-process pod would make each sample very long)."""
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
