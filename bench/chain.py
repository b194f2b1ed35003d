"""The chain benchmark: route-tune in a real libcni chain, against Debian's sbr.

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
  7. node repair latency (bench/repair.py, on a lab of its own after this one is removed):
     deletion to restored, median and p99; the resident increment is printed next to the
     figure from before the engine became a node service.
Then the goal verdicts (bench/README.md), and for each missed goal a profile (bench/_profile.py).
The measuring is in _phases.py, the report and verdicts in _report.py.

Nothing outside the namespaces it creates is touched; they are removed at the end (also on ^C).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# _phases puts the checkout on sys.path (for cniplugin) when it is imported.
from _phases import BURST_PODS, FOREIGN_ROUTES, HOST_TABLE, NIC_REPS, TAG, VERSION_REPS, Bench, burst_pod
from _report import Results, report


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
            status = inner_proc.wait()
        except KeyboardInterrupt:
            if inner_proc and inner_proc.poll() is None:
                inner_proc.terminate()
                inner_proc.wait()
            print("interrupted; lab removed", file=sys.stderr)
            return 130
    # Node repair latency, measured on a lab of its own once this one is gone (bench/repair.py).
    print("\n## Node repair latency (bench/repair.py)\n", flush=True)
    repair = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "repair.py")])
    return status or repair.returncode


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
        phases_done = Results(s=s, peak=peak, burst=burst, burst_pods=burst_pods, foreign=foreign,
                              mem_series=mem_series, ver=ver, mem_start=mem_start,
                              mem_rounds=mem_rounds, mem_burst=mem_burst, quick=quick,
                              elapsed=elapsed, loads=loads, state_fs=state_fs, phases=phases)
        out, misses = report(phases_done)
        print("\n" + "\n".join(out), flush=True)
        kinds = ["cold", "warm", "version", "foreign"] if profile_always else misses
        if kinds:
            print(f"\n## Profiles of the missed goals ({', '.join(kinds)}), in the node netns, net1 attached\n", flush=True)
            bench.profile(kinds)
        return 0
    finally:
        bench.stop_server()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 20; --quick 3)")
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
