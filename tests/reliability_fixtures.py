"""Plumbing shared by the reliability, hostile-input, security and soak suites (netns tag ``rtR``).

Import with ``from reliability_fixtures import *``. What it gives:

- ``engine``: parametrised over ``ENGINES`` (``inprocess``, ``resident``). Override in a test with
  ``@pytest.mark.parametrize("engine", ["inprocess"], indirect=True)``.
- ``make_rig(family="4", rails=2, **node_defaults) -> Rig``: a fresh lab (``cniplugin.lab``
  topology, prefix ``rtR<pid>x<n>``) with its own node defaults, state and log dirs, the Python
  runtime (``PyRuntime``), and in resident mode a ``cni-route-tune serve`` running inside the lab's
  node netns with ``ROUTE_TUNE_SOCKET``/``ROUTE_TUNE_ENGINE=resident`` set for every plugin call.
  Teardown stops the server and fails the test if resident mode served nothing (a plugin that
  silently ran in-process would make every resident test vacuous).
- ``Rig.snapshot()`` / ``snapshot_diff(a, b)``: the WHOLE state used for before/after checks: pod
  and node (rules of both families, every table, links, addresses, configured neighbours, sysctls:
  ``OverlayLab.state``) plus each side's nft ruleset and every file under the state dir.
- ``Rig.rt(command, k, prev, ...)``: route-tune ALONE, exactly as a runtime calls it (env + stdin,
  inside the node netns), returning the raw ``Reply`` (exit code, stdout, stderr).
- ``assert_cni_error(reply, code)``: exit 1 and ONE well-formed CNI error object on stdout.
- ``Farm``: one node, P pods (Calico-style eth0 each) and K rails shared by all pods, for the
  concurrency suite.

Namespaces are created only by these helpers and always removed: each lab at test teardown, this
session's leftovers at session end, and labs of dead sessions (owner pid gone) at session start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cniplugin._version import SUPPORTED_VERSIONS
from cniplugin.lab.runtime import PluginEnv, PyRuntime, RailPod, rail_conflist
from cniplugin.lab.sessions import LabNames
from cniplugin.lab.topology import (CALI_MAC, OverlayLab, _decode_many, cleanup, ip_batch,
                                    netns_names, run, state_diff)
from conftest import CNI_ROUTE_TUNE, REPO, ROUTE_TUNE, details_repeat, require_root

PREFIX = "rtR"
ENGINES = ("inprocess", "resident")
PYTHON = REPO / ".venv" / "bin" / "python"
#: rtR<pid base36>x<n>: this session's lab names (at most 11 characters with the counter).
NAMES = LabNames(PREFIX)
SESSION_PREFIX = NAMES.prefix


def new_prefix() -> str:
    return NAMES.next()


@pytest.fixture(scope="session")
def rtr_session() -> Iterator[None]:
    require_root("ip", "nft")
    NAMES.cleanup_stale()
    yield
    cleanup(SESSION_PREFIX)


# ---------------------------------------------------------------------------- replies

@dataclass
class Reply:
    """What one plugin process printed and returned."""

    code: int
    stdout: bytes
    stderr: bytes

    @property
    def json(self):
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return (f"exit {self.code}\nstdout: {self.stdout.decode(errors='replace')[:2000]}\n"
                f"stderr: {self.stderr.decode(errors='replace')[-2000:]}")


def assert_cni_error(reply: Reply, code: int | tuple[int, ...]) -> dict:
    """Exit 1 and exactly ONE well-formed CNI error object on stdout with ``code``."""
    assert reply.code == 1, str(reply)
    text = reply.stdout.decode()
    err = json.loads(text)  # the whole stdout is one JSON document (raises otherwise)
    assert isinstance(err, dict), str(reply)
    assert set(err) <= {"cniVersion", "code", "msg", "details"}, str(reply)
    assert err.get("cniVersion") in SUPPORTED_VERSIONS, str(reply)
    assert isinstance(err.get("code"), int) and isinstance(err.get("msg"), str) and err["msg"], \
        str(reply)
    assert isinstance(err.get("details", ""), str), str(reply)
    codes = code if isinstance(code, tuple) else (code,)
    assert err["code"] in codes, f"want code {codes}, got:\n{reply}"
    repeated = details_repeat(err["msg"], err.get("details", ""))
    assert not repeated, f"details repeats msg ({repeated!r}):\n{reply}"
    return err


# ---------------------------------------------------------------------------- resident server

def server_cmd(sock: Path) -> list[str]:
    """The resident engine as a node runs it: ``cni-route-tune serve`` on a private socket."""
    return [str(CNI_ROUTE_TUNE), "serve", "--socket", str(sock)]


class Resident:
    """``cni-route-tune serve`` inside ``node_ns`` (``ip netns exec`` execs: ``pid`` is the server)."""

    def __init__(self, node_ns: str, penv: PluginEnv, extra_env: dict[str, str] | None = None):
        self.node_ns, self.penv = node_ns, penv
        self.sock = penv.workdir / "run" / "engine.sock"
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen | None = None
        self.stderr_path = penv.workdir / "server.stderr"

    def start(self) -> Resident:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "ROUTE_TUNE_DEFAULTS": str(self.penv.defaults_file), **self.extra_env}
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.node_ns, *server_cmd(self.sock)],
                                         env=env, stdout=subprocess.DEVNULL, stderr=err)
        while not self.answers():
            assert self.proc.poll() is None, f"server died at start:\n{self.log()}"
            time.sleep(0.02)
        return self

    def answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.sock))
            except OSError:
                return False
        return True

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def kill(self) -> None:
        """SIGKILL (a crash): no cleanup runs, the socket file stays behind."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait()

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""


def delete_pod_netns(lab: OverlayLab) -> None:
    """``ip netns del`` the pod and wait until the kernel has really destroyed it (its veth end
    ``cali<prefix>`` gone from the node): netns teardown runs asynchronously, and a process or
    thread still holding the netns would keep it alive - that is reported, after a minute."""
    run("ip", "netns", "del", lab.pod)
    for _ in range(1200):
        links = json.loads(run("ip", "-n", lab.node, "-j", "link", "show").stdout)
        if lab.cali not in {link["ifname"] for link in links}:
            return
        time.sleep(0.05)
    raise AssertionError(f"{lab.pod} was deleted a minute ago but {lab.cali} is still on the node: "
                         "something still holds the pod's netns")


def served_count(penv: PluginEnv) -> int:
    """Requests the resident engine answered (its "served via resident engine" log lines)."""
    total = 0
    for path in penv.log_dir.glob("route-tune.log*"):
        total += path.read_text(errors="replace").count("served via resident engine")
    return total


# ---------------------------------------------------------------------------- whole state

def nft_ruleset(ns: str) -> str:
    return run("ip", "netns", "exec", ns, "nft", "list", "ruleset").stdout


def state_files(state_dir: Path) -> list[str]:
    """Every file and directory under the state dir (the empty ``attachments`` root excepted)."""
    out = []
    for path in sorted(state_dir.rglob("*")):
        rel = str(path.relative_to(state_dir))
        if rel != "attachments":
            out.append(rel + ("/" if path.is_dir() else ""))
    return out


def ns_state(lab: OverlayLab, ns: str) -> dict:
    return {**lab.state(ns), "nft": nft_ruleset(ns)}


def snapshot_diff(before: dict, after: dict) -> str:
    """Readable difference of two ``Rig.snapshot()`` values ("" when equal)."""
    lines = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        if key == "files":
            lines += [f"files: - {f}" for f in a or [] if f not in (b or [])]
            lines += [f"files: + {f}" for f in b or [] if f not in (a or [])]
            continue
        if a is None or b is None:
            lines.append(f"{key}: {'appeared' if a is None else 'disappeared'}")
            continue
        sub = state_diff({k: v for k, v in a.items() if k != "nft"},
                         {k: v for k, v in b.items() if k != "nft"})
        lines += [f"[{key}] {line}" for line in sub.splitlines()]
        if a.get("nft") != b.get("nft"):
            lines.append(f"[{key}] nft ruleset changed:\n--- before\n{a.get('nft')}\n+++ after\n"
                         f"{b.get('nft')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the rig

@dataclass
class Rig:
    """A lab plus everything one engine mode needs; see the module docstring."""

    lab: OverlayLab
    engine: str
    defaults: dict = field(default_factory=dict)
    container_id: str = "rtr-pod-1"
    penv: PluginEnv = field(init=False)
    server: Resident | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        workdir = self.lab.tmp / "penv"
        self.penv = PluginEnv(workdir, family=self.lab.family, defaults=dict(self.defaults),
                              env={"ROUTE_TUNE_ENGINE": self.engine})
        if self.engine == "resident":
            self.server = Resident(self.lab.node, self.penv)
            self.penv.env["ROUTE_TUNE_SOCKET"] = str(self.server.sock)
            self.server.start()
        self.runtime = PyRuntime(self.lab.node, self.penv)
        self.plugins_called = 0

    # -- pods: the full chain, or the interface alone (route-tune then called by hand) ------
    def pod(self, **kw) -> RailPod:
        """The seed pod's rail chains ``[macvlan + host-local, route-tune]`` (keys via ``kw``)."""
        self.plugins_called += 1
        return RailPod(self.lab, self.penv, self.runtime, container_id=self.container_id, **kw)

    def bare(self) -> RailPod:
        """The rail chains without route-tune: ``add(k)`` gives the prevResult route-tune gets."""
        return RailPod(self.lab, self.penv, self.runtime, container_id=self.container_id,
                       chained=None)

    def conf(self, k: int, keys: dict | None = None, cni_version: str = "1.0.0") -> dict:
        """Rail k's route-tune plugin config as the runtime hands it (name + cniVersion)."""
        conflist = rail_conflist(k, self.lab.family, keys or {}, data_dir=self.penv.ipam_dir,
                                 cni_version=cni_version)
        return {**conflist["plugins"][-1], "name": conflist["name"], "cniVersion": cni_version}

    def env(self, command: str, ifname: str, *, netns: str | None = None,
            container_id: str | None = None, extra: dict | None = None) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self.penv.env,
                "CNI_PATH": self.penv.cni_path, "CNI_COMMAND": command,
                "CNI_CONTAINERID": self.container_id if container_id is None else container_id,
                "CNI_NETNS": self.lab.pod_netns if netns is None else netns,
                "CNI_IFNAME": ifname, "CNI_ARGS": "", **(extra or {})}

    def exec_plugin(self, env: dict[str, str], stdin: bytes | str | dict) -> Reply:
        """Run the installed ``route-tune`` inside the node netns with exactly ``env``/``stdin``."""
        if isinstance(stdin, dict):
            stdin = json.dumps(stdin)
        if isinstance(stdin, str):
            stdin = stdin.encode()
        self.plugins_called += 1
        proc = subprocess.run(["ip", "netns", "exec", self.lab.node, str(ROUTE_TUNE)],
                              input=stdin, env=env, capture_output=True, check=False)
        return Reply(proc.returncode, proc.stdout, proc.stderr)

    def rt(self, command: str, k: int, prev: dict | None = None, *, keys: dict | None = None,
           netns: str | None = None, extra_env: dict | None = None, ifname: str | None = None,
           container_id: str | None = None) -> Reply:
        """route-tune alone for rail k (``prev`` = prevResult; None sends none)."""
        conf = self.conf(k, keys)
        if prev is not None:
            conf["prevResult"] = prev
        env = self.env(command, ifname or f"net{k}", netns=netns, container_id=container_id,
                       extra=extra_env)
        return self.exec_plugin(env, conf)

    # -- state ----------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Pod + node (both families, all tables, links, neighbours, sysctls, nft) + state files."""
        namespaces = [ns for ns in (self.lab.pod, self.lab.node) if ns in netns_names(self.lab.prefix)]
        with ThreadPoolExecutor(2) as pool:
            states = dict(zip(namespaces, pool.map(lambda ns: ns_state(self.lab, ns), namespaces)))
        return {**states, "files": state_files(self.penv.state_dir)}

    def assert_unchanged(self, before: dict, what: str = "") -> None:
        diff = snapshot_diff(before, self.snapshot())
        assert diff == "", f"{what}: state differs from before:\n{diff}"

    def state_records(self) -> list[str]:
        return [f for f in state_files(self.penv.state_dir) if f.endswith(".json")]

    def close(self) -> None:
        try:
            if self.server is not None:
                status = self.server.stop()
                assert status in (0, -signal.SIGKILL, None), \
                    f"server exited {status}:\n{self.server.log()[-3000:]}"
                if self.plugins_called:
                    assert served_count(self.penv) > 0, (
                        "resident mode, but the server served no request: the plugin ran "
                        "in-process, so this test proved nothing about the resident engine")
        finally:
            self.lab.close()


class UnderlayLab(OverlayLab):
    """The lab's namespaces, but the pod's eth0 is a macvlan on the node's uplink (underlay).

    node ``uplink`` 10.6.0.4/24 (fd00:6::4/64), underlay gateway 10.6.0.1 (fd00:6::1) in the
    ``infra`` ns; pod eth0 10.6.0.50/24 (fd00:6::50/64) default via that gateway; rails as in
    the overlay lab. route-tune's first (eth0) ADD in underlay mode creates the veth0 pair and
    its nftables table, so a crash sweep over it covers those too.
    """

    UNDERLAY = {"4": ("10.6.0.4/24", "10.6.0.1", "10.6.0.50/24"),
                "6": ("fd00:6::4/64", "fd00:6::1", "fd00:6::50/64")}

    def _build(self) -> None:
        ks = range(1, self.rails + 1)
        ip_batch([f"netns add {n}" for n in self.namespaces])
        for ns in self.namespaces:
            self._sysctls(ns, {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0,
                               **({"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1}
                                  if ns == self.node else {})})
        node = ["link set lo up", f"link add uplink type veth peer name tonode netns {self.infra}",
                "link set uplink up", "link add eth0 link uplink type macvlan mode bridge",
                f"link set eth0 netns {self.pod}"]
        node += [f"link add rail{k} type veth peer name rail netns {self.gw(k)}" for k in ks]
        node += [f"link set rail{k} up" for k in ks]
        pod, infra = ["link set lo up", "link set eth0 up"], ["link set lo up", "link set tonode up"]
        for fam in self.families:
            node_ip, gw, pod_ip = self.UNDERLAY[fam]
            node += [f"addr add {node_ip} dev uplink nodad" if fam == "6" else f"addr add {node_ip} dev uplink"]
            infra.append(f"addr add {gw}/{node_ip.split('/')[1]} dev tonode" + (" nodad" if fam == "6" else ""))
            pod += [f"addr add {pod_ip} dev eth0" + (" nodad" if fam == "6" else ""),
                    f"route add default via {gw} dev eth0"]
        node += [f"route add default via {self.UNDERLAY[f][1]} dev uplink" for f in self.families]
        ip_batch(node, self.node)
        ip_batch(infra, self.infra)
        ip_batch(pod, self.pod)
        for k in ks:
            gw = ["link set lo up", "link set rail up"]
            for fam in self.families:
                gw += [f"addr add {self.gw_ip(k, fam)}/{24 if fam == '4' else 64} dev rail"
                       + (" nodad" if fam == "6" else "")]
            ip_batch(gw, self.gw(k))

    def eth0_prev(self) -> dict:
        """The prevResult macvlan + IPAM would hand route-tune for eth0."""
        ips = [{"address": self.UNDERLAY[f][2], "gateway": self.UNDERLAY[f][1], "interface": 0}
               for f in self.families]
        return {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": self.pod_netns}],
                "ips": ips}


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_rig(rtr_session: None, engine: str) -> Iterator[Callable[..., Rig]]:
    """Factory: ``make_rig(family="4", rails=2, **node_defaults)`` -> a ``Rig`` (closed at teardown)."""
    rigs: list[Rig] = []

    def make(family: str = "4", rails: int = 2, lab_class: type = OverlayLab, **defaults: object) -> Rig:
        lab = lab_class(new_prefix(), rails=rails, family=family).__enter__()
        try:
            rig = Rig(lab, engine, dict(defaults))
        except BaseException:
            lab.close()
            raise
        rigs.append(rig)
        return rig

    try:
        yield make
    finally:
        errors = []
        for rig in rigs:
            try:
                rig.close()
            except AssertionError as exc:
                errors.append(str(exc))
        assert not errors, "\n".join(errors)


# ---------------------------------------------------------------------------- the farm

POD_NET = "10.233.120"     # pod i's eth0: 10.233.120.<i+1>/32


@dataclass
class Farm:
    """One node netns, ``pods`` pod netns and ``rails`` rails shared by every pod (IPv4).

    Pod i (0-based): ns ``<prefix>-p<i>``, eth0 ``10.233.120.<i+1>/32`` whose node end is
    ``cali<i>`` (Calico MAC, proxy ARP); on rail k its macvlan ``netk`` on the node's ``railk``
    gets ``172.16.1k.<20+i>/24`` (static IPAM) with gateway ``172.16.1k.254`` in ns ``<prefix>-g<k>``.
    """

    prefix: str
    pods: int
    rails: int
    tmp: Path = field(init=False)

    node = property(lambda self: f"{self.prefix}-node")

    def pod(self, i: int) -> str:
        return f"{self.prefix}-p{i}"

    def gw(self, k: int) -> str:
        return f"{self.prefix}-g{k}"

    def pod_ip(self, i: int) -> str:
        return f"{POD_NET}.{i + 1}"

    def rail_ip(self, i: int, k: int) -> str:
        return f"172.16.1{k}.{20 + i}"

    @property
    def namespaces(self) -> list[str]:
        return ([self.node, f"{self.prefix}-infra"] + [self.pod(i) for i in range(self.pods)]
                + [self.gw(k) for k in range(1, self.rails + 1)])

    def __enter__(self) -> Farm:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-lab-"))
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        ip_batch([f"netns del {n}" for n in netns_names(self.prefix + "-")])
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _build(self) -> None:
        ip_batch([f"netns add {n}" for n in self.namespaces])
        infra = f"{self.prefix}-infra"

        def sysctls(ns: str, extra: tuple[str, ...] = ()) -> None:
            run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0", *extra)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda ns: sysctls(ns, ("net.ipv4.ip_forward=1",) if ns == self.node else ()),
                          self.namespaces))
        node = ["link set lo up", f"link add uplink type veth peer name tonode netns {infra}",
                "link set uplink up", "addr add 10.1.20.4/24 dev uplink"]
        for i in range(self.pods):
            node += [f"link add cali{i} address {CALI_MAC} type veth peer name eth0 netns {self.pod(i)}",
                     f"link set cali{i} up", f"route add {self.pod_ip(i)}/32 dev cali{i} scope link"]
        for k in range(1, self.rails + 1):
            node += [f"link add rail{k} type veth peer name rail netns {self.gw(k)}", f"link set rail{k} up"]
        node.append("route add default via 10.1.20.1 dev uplink")
        ip_batch(node, self.node)
        jobs = [(infra, ["link set lo up", "link set tonode up", "addr add 10.1.20.1/24 dev tonode"])]
        for i in range(self.pods):
            jobs.append((self.pod(i), ["link set lo up", "link set eth0 up",
                                       f"addr add {self.pod_ip(i)}/32 dev eth0",
                                       "route add 169.254.1.1 dev eth0 scope link",
                                       "route add default via 169.254.1.1 dev eth0"]))
        for k in range(1, self.rails + 1):
            jobs.append((self.gw(k), ["link set lo up", "link set rail up",
                                      f"addr add 172.16.1{k}.254/24 dev rail",
                                      f"addr add 198.18.{k}.1/32 dev lo"]))
        cali = [f"net.ipv4.conf.cali{i}.proxy_arp=1" for i in range(self.pods)]
        cali += [f"net.ipv4.neigh.cali{i}.proxy_delay=0" for i in range(self.pods)]
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ip_batch, lines, ns) for ns, lines in jobs]
            futures.append(pool.submit(run, "ip", "netns", "exec", self.node, "sysctl", "-qw", *cali))
            for fut in futures:
                fut.result()

    def conflist(self, i: int, k: int, keys: dict | None = None) -> dict:
        """Rail k's chain for pod i: macvlan on railk with static IPAM, then route-tune."""
        ipam = {"type": "static", "addresses": [{"address": f"{self.rail_ip(i, k)}/24",
                                                 "gateway": f"172.16.1{k}.254"}]}
        return {"cniVersion": "1.0.0", "name": f"rail{k}", "plugins": [
            {"type": "macvlan", "master": f"rail{k}", "mode": "bridge", "ipam": ipam},
            {"type": "route-tune", **(keys or {})}]}

    def state(self, ns: str) -> dict:
        """Whole-state snapshot of one farm namespace (same shape as ``OverlayLab.state``)."""
        return {**OverlayLab.state(self, ns), "nft": nft_ruleset(ns)}  # type: ignore[arg-type]

    def exec(self, ns: str, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return OverlayLab.exec(self, ns, *cmd, check=check, **kw)  # type: ignore[arg-type]

    def route_get_many(self, ns: str, queries: list[tuple[str, str | None]]) -> list[dict]:
        """``ip route get DST [from SRC]`` for every query, in ONE ``ip -batch`` process."""
        lines = [f"route get {dst}" + (f" from {src}" if src else "") for dst, src in queries]
        return [doc[0] for doc in _decode_many(ip_batch(lines, ns, "-j"))]


@contextlib.contextmanager
def farm(pods: int, rails: int) -> Iterator[Farm]:
    with Farm(new_prefix(), pods, rails) as f:
        yield f


__all__ = ["ENGINES", "Farm", "PREFIX", "Reply", "Resident", "Rig", "UnderlayLab", "assert_cni_error", "delete_pod_netns",
           "engine", "farm", "make_rig", "new_prefix", "ns_state", "nft_ruleset", "rtr_session",
           "served_count", "snapshot_diff", "state_files"]
