"""Cost of the gateway reachability probe (``detectGateway``): ``check_gateways`` per call.

Run (root):  .venv/bin/python bench/probe_gateway.py [--runs 50]

Three throwaway netns (tag ``rtD``): a pod and its gateway, each on a veth into a bridge in a
switch netns, as in tests/kernel/test_probe_netns.py (10.77.0.10/24 -> 10.77.0.1, fd77::10/64 ->
fd77::1). In the pod it times ``check_gateways`` (socket open to close)
against the live IPv4 and IPv6 gateway, ``--runs`` calls each (median, p90, max), and a few calls
against a dead one (bounded by the default ProbeOptions). The peer, measured in the same run and
interleaved, is one ICMP echo round trip to the same gateway (``cniplugin.lab.ping.probe``): each
median is also printed as a ratio to it. Nothing outside the namespaces it creates is touched.
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
from cniplugin.kernel.probe import ProbeOptions, check_gateways  # noqa: E402
from cniplugin.lab.ping import probe as echo  # noqa: E402

POD = {4: ("10.77.0.10", "10.77.0.1", "10.77.0.99"), 6: ("fd77::10", "fd77::1", "fd77::99")}
DEFAULTS = ProbeOptions()


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True)


def ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(runs: int) -> list[str]:
    out = []
    for family, (pod, gw, dead) in POD.items():
        probes, echoes = [], []
        for _ in range(50):  # warm-up: the gateway answers (links up, addresses usable)
            if echo(pod, gw, 0.2, 0x7274, 0)["ok"]:
                break
        for seq in range(runs):
            probes.append(ms(lambda: check_gateways("rtDpod0", [(pod, gw)], DEFAULTS)))
            result = {}
            echoes.append(ms(lambda: result.update(echo(pod, gw, 2.0, 0x7274, seq))))
            assert result["ok"], result
        probes.sort()
        p, e = statistics.median(probes), statistics.median(echoes)
        out.append(f"| IPv{family} live gateway {gw} | {p:.2f} | {probes[int(runs * 0.9) - 1]:.2f} | "
                   f"{probes[-1]:.2f} | {e:.2f} | {p / e:.1f}x |")
        deads = []
        for _ in range(5):
            t0 = time.perf_counter()
            try:
                check_gateways("rtDpod0", [(pod, dead)], DEFAULTS)
            except Exception:  # noqa: BLE001 - a dead gateway is reported by raising
                pass
            deads.append((time.perf_counter() - t0) * 1e3)
        out.append(f"| IPv{family} dead gateway {dead} (bound {DEFAULTS.bound * 1e3:.0f} ms) | "
                   f"{statistics.median(deads):.1f} | - | {max(deads):.1f} | {e:.2f} | "
                   f"{statistics.median(deads) / e:.0f}x |")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    tag = uuid.uuid4().hex[:5]
    pod, gw, sw = f"rtD-bpod-{tag}", f"rtD-bgw-{tag}", f"rtD-bsw-{tag}"
    try:
        for ns in (pod, gw, sw):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            ip(ns, "link", "set", "lo", "up")
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
                            "net.ipv6.conf.default.accept_dad=0"], check=True)
        ip(sw, "link", "add", "rtDbr0", "type", "bridge", "mcast_snooping", "0")
        ip(sw, "link", "set", "rtDbr0", "up")
        for ns, dev in ((pod, "rtDpod0"), (gw, "rtDgw0")):
            ip(ns, "link", "add", dev, "type", "veth", "peer", "name", f"{dev}s", "netns", sw)
            ip(sw, "link", "set", f"{dev}s", "master", "rtDbr0", "up")
        for ns, dev, (v4, v6) in ((pod, "rtDpod0", (POD[4][0], POD[6][0])),
                                  (gw, "rtDgw0", (POD[4][1], POD[6][1]))):
            ip(ns, "addr", "add", f"{v4}/24", "dev", dev)
            ip(ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            ip(ns, "link", "set", dev, "up")
        box: dict = {}

        def body() -> None:  # setns is per thread: run the whole measurement in one
            fd = _netns.open_netns(f"/run/netns/{pod}")
            with _netns.entered(fd):
                box["rows"] = measure(args.runs)

        thread = threading.Thread(target=body)
        thread.start()
        thread.join()
        print(f"check_gateways, ms over {args.runs} calls (dead: 5); peer = one ICMP echo round trip\n")
        print("| case | median | p90 | max | peer echo median | ratio |\n|---|---:|---:|---:|---:|---:|")
        print("\n".join(box["rows"]))
    finally:
        for ns in (pod, gw, sw):
            subprocess.run(["ip", "netns", "del", ns], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
