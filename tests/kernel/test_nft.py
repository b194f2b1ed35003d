"""Reply steering (cniplugin.kernel.nft) against the real kernel, in the harness's throwaway namespaces.

Topology of the behaviour test (addresses per family)::

    client ns                              pod ns
    lo   CLIENT (the peer address)
    a0   NET_A.2  ==== veth pair ====  veth0  NET_A.1   (table 100: default via NET_A.2)
    b0   NET_B.2  ==== veth pair ====  eth0   NET_B.1   (main: CLIENT via NET_B.2)

The client connects to the pod's veth0 address. Without steering the pod answers along its main
route (eth0); with it the replies go back through veth0. Counters in a test-owned ``table inet
other`` in the pod count the server's replies per egress link (and prove that table untouched).
Every nft call of route-tune runs in a thread that setns()'d into the pod: the root namespace is
never touched and must never see route-tune's table.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Callable

import pytest

from harness.host import in_netns, require, wait_until

from cniplugin.kernel import nft as _nft
from cniplugin.protocol.errors import NetfilterError

pytestmark = pytest.mark.netns
PORT = 5555


def sh(*argv: str, netns: str | None = None, stdin: str | None = None) -> str:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    proc = subprocess.run([*prefix, *argv], input=stdin, capture_output=True, text=True)
    assert proc.returncode == 0, f"{argv}: {proc.stderr}"
    return proc.stdout


def root_has_our_table() -> bool:
    # Read-only look at the root namespace: route-tune must never have created anything there.
    return f"table inet {_nft.TABLE}" in sh("nft", "list", "tables")


@pytest.fixture
def netns(make_netns) -> Callable[[str], str]:
    """Factory of throwaway namespaces (the harness's), all deleted afterwards."""
    return make_netns


@pytest.fixture(params=["libnftables", "nft-binary"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both backends: the ctypes library, and the ``nft -f -`` fallback."""
    if request.param == "libnftables":
        require("" if _nft._library() is not None else "libnftables.so.1 not loadable")
    else:
        monkeypatch.setattr(_nft, "_lib_state", [None])
    return request.param


OTHER_TABLE = """table inet other {
\tcounter via_veth0 {
\t}

\tcounter via_eth0 {
\t}

\tcounter foreign_kept {
\t}

\tchain post {
\t\ttype filter hook postrouting priority filter; policy accept;
\t\toifname "veth0" tcp sport 5555 counter name "via_veth0"
\t\toifname "eth0" tcp sport 5555 counter name "via_eth0"
\t\ttcp sport 5555 meta mark & 0x00000100 == 0x00000100 counter name "foreign_kept"
\t}
}
"""
# Another tool's mark (bit 8), set before route-tune's output chain; a filter chain never reroutes.
FOREIGN_MARK_CHAIN = """table inet other {
\tchain out {
\t\ttype filter hook output priority raw; policy accept;
\t\ttcp sport 5555 meta mark set meta mark | 0x00000100
\t}
}
"""


def add_other_table(pod: str, foreign_mark: bool = False) -> None:
    extra = FOREIGN_MARK_CHAIN if foreign_mark else ""
    sh("nft", "-f", "-", netns=pod, stdin=OTHER_TABLE + extra)


def other_table(pod: str) -> str:
    return sh("nft", "-s", "list", "table", "inet", "other", netns=pod)


def other_counters(pod: str) -> dict[str, int]:
    out = json.loads(sh("nft", "-j", "list", "counters", "table", "inet", "other", netns=pod))
    return {o["counter"]["name"]: o["counter"]["packets"] for o in out["nftables"]
            if "counter" in o}


# --- ruleset read back ---------------------------------------------------------------------------

def test_ensure_twice_gives_one_table_with_the_expected_ruleset(netns, backend):
    pod = netns("pod")
    assert in_netns(pod, _nft.read_reply_steering) is None
    in_netns(pod, _nft.ensure_reply_steering)
    in_netns(pod, _nft.ensure_reply_steering)
    assert in_netns(pod, _nft.read_reply_steering) == _nft.expected_reply_steering()
    tables = sh("nft", "list", "tables", netns=pod).splitlines()
    assert tables == ["table inet route_tune"]
    assert not root_has_our_table()


def test_reensure_with_other_parameters_converges(netns, backend):
    pod = netns("pod")
    in_netns(pod, lambda: _nft.ensure_reply_steering("eth7", 0x100, 0xFF00))
    in_netns(pod, lambda: _nft.ensure_reply_steering("veth0", 0x4000, 0x4000))
    assert in_netns(pod, _nft.read_reply_steering) == _nft.expected_reply_steering(
        "veth0", 0x4000, 0x4000)
    # The whole table (chains, rules) is replaced, not appended to.
    assert sh("nft", "list", "ruleset", netns=pod).count("iifname") == 1


@pytest.mark.parametrize("mark,mask", [(0x1, 0xFFFFFFFF), (0x100, 0xFF00), (0x10000, 0x30000)])
def test_expected_text_matches_kernel_for_masks(netns, mark, mask):
    pod = netns("pod")
    in_netns(pod, lambda: _nft.ensure_reply_steering("veth0", mark, mask))
    assert in_netns(pod, _nft.read_reply_steering) == _nft.expected_reply_steering(
        "veth0", mark, mask)


def test_other_tables_untouched_and_remove_twice_ok(netns, backend):
    pod = netns("pod")
    add_other_table(pod)
    before = other_table(pod)
    in_netns(pod, _nft.ensure_reply_steering)
    assert other_table(pod) == before
    in_netns(pod, _nft.remove_reply_steering)
    in_netns(pod, _nft.remove_reply_steering)
    assert in_netns(pod, _nft.read_reply_steering) is None
    assert other_table(pod) == before
    assert sh("nft", "list", "tables", netns=pod).splitlines() == ["table inet other"]


def test_remove_on_a_netns_without_any_table(netns, backend):
    pod = netns("pod")
    in_netns(pod, _nft.remove_reply_steering)
    assert sh("nft", "list", "ruleset", netns=pod) == ""


def test_drifted_table_is_replaced_whole(netns, backend):
    pod = netns("pod")
    in_netns(pod, _nft.ensure_reply_steering)
    sh("nft", "add", "rule", "inet", "route_tune", "output", "counter", netns=pod)
    sh("nft", "add", "chain", "inet", "route_tune", "stray", netns=pod)
    in_netns(pod, _nft.ensure_reply_steering)
    assert in_netns(pod, _nft.read_reply_steering) == _nft.expected_reply_steering()


def test_creation_race_falls_back_to_replace(netns, backend, monkeypatch):
    pod = netns("pod")
    sh("nft", "add", "table", "inet", "route_tune", netns=pod)  # appears after our read
    monkeypatch.setattr(_nft, "read_reply_steering", lambda: None)
    in_netns(pod, _nft.ensure_reply_steering)
    monkeypatch.undo()
    assert in_netns(pod, _nft.read_reply_steering) == _nft.expected_reply_steering()


def test_failed_ensure_keeps_the_previous_table(netns, monkeypatch):
    pod = netns("pod")
    in_netns(pod, _nft.ensure_reply_steering)
    # A batch the kernel rejects half-way (bad priority keyword) must abort as a whole.
    broken = _nft.expected_reply_steering().replace("priority mangle", "priority nosuch", 1)
    monkeypatch.setattr(_nft, "expected_reply_steering", lambda *a: broken)
    with pytest.raises(NetfilterError) as info:
        in_netns(pod, _nft.ensure_reply_steering)
    assert info.value.code == 106 and info.value.details
    monkeypatch.undo()
    assert in_netns(pod, _nft.read_reply_steering) == _nft.expected_reply_steering()


@pytest.mark.parametrize("args", [("", 1, 1), ("a b", 1, 1), ('x"y', 1, 1), ("x" * 16, 1, 1),
                                  ("veth0", 0, 1), ("veth0", 2, 1), ("veth0", 1, 1 << 32)])
def test_bad_arguments_are_refused_before_touching_the_kernel(args):
    with pytest.raises(ValueError):
        _nft.ensure_reply_steering(*args)


# --- behaviour: replies leave through veth0 ------------------------------------------------------

FAMILIES = {
    4: {"net_a": "10.9.1", "net_b": "10.9.2", "plen": 24, "client": "10.9.3.3", "host": 32,
        "sep": "."},
    6: {"net_a": "fd00:9:1:", "net_b": "fd00:9:2:", "plen": 64, "client": "fd00:9:3::3",
        "host": 128, "sep": ":"},
}


def _addr(fam: dict, net: str, host: int) -> str:
    return f"{fam[net]}{fam['sep']}{host}"


def build_pod_and_client(netns, family: int, fwmark: str) -> tuple[str, str, dict]:
    fam = FAMILIES[family]
    pod, cli = netns("pod"), netns("cli")
    sh("ip", "link", "add", "veth0", "netns", pod, "type", "veth", "peer", "a0", "netns", cli)
    sh("ip", "link", "add", "eth0", "netns", pod, "type", "veth", "peer", "b0", "netns", cli)
    for ns, dev, net, host in ((pod, "veth0", "net_a", 1), (pod, "eth0", "net_b", 1),
                               (cli, "a0", "net_a", 2), (cli, "b0", "net_b", 2)):
        sh("ip", "addr", "add", f"{_addr(fam, net, host)}/{fam['plen']}", "dev", dev,
           *(["nodad"] if family == 6 else []), netns=ns)
        sh("ip", "link", "set", dev, "up", netns=ns)
    sh("ip", "addr", "add", f"{fam['client']}/{fam['host']}", "dev", "lo", netns=cli)
    if family == 4:  # replies may arrive on the "wrong" link: no reverse-path filtering here
        for ns in (pod, cli):
            for dev in ("all", "default", "veth0" if ns == pod else "a0",
                        "eth0" if ns == pod else "b0"):
                sh("sysctl", "-qw", f"net.ipv4.conf.{dev}.rp_filter=0", netns=ns)
    ip = ["ip", f"-{family}"]
    sh(*ip, "route", "add", fam["client"], "via", _addr(fam, "net_b", 2), "dev", "eth0", netns=pod)
    sh(*ip, "route", "add", "default", "via", _addr(fam, "net_a", 2), "dev", "veth0",
       "table", "100", netns=pod)
    sh(*ip, "rule", "add", "pref", "1000", "fwmark", fwmark, "lookup", "100", netns=pod)
    sh(*ip, "route", "add", _addr(fam, "net_a", 1), "dev", "a0", netns=cli)
    return pod, cli, fam


def exchange(pod: str, cli: str, fam: dict, family: int) -> None:
    """One TCP connection client -> pod's veth0 address, 20 request/reply round trips."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    server = in_netns(pod, lambda: socket.socket(af, socket.SOCK_STREAM))
    client = in_netns(cli, lambda: socket.socket(af, socket.SOCK_STREAM))
    with server, client:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((_addr(fam, "net_a", 1), PORT))
        server.listen(1)

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                while data := conn.recv(64):
                    conn.sendall(data.upper())

        thread = threading.Thread(target=serve)
        thread.start()
        client.bind((fam["client"], 0))
        client.connect((_addr(fam, "net_a", 1), PORT))
        for _ in range(20):
            client.sendall(b"ping")
            assert client.recv(64) == b"PING"
        client.shutdown(socket.SHUT_WR)
        client.recv(64)
        thread.join()


def replies(pod: str, cli: str, fam: dict, family: int) -> dict[str, int]:
    before = other_counters(pod)
    exchange(pod, cli, fam, family)
    # The pod's last packet (its FIN) has passed the postrouting hook once its side of the
    # connection is gone (the FIN was acknowledged).
    wait_until(lambda: not sh("ss", "-Htan", f"sport = :{PORT}", netns=pod).strip(),
               what=f"the pod's connection on port {PORT} to close")
    after = other_counters(pod)
    return {k: after[k] - before[k] for k in after}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("foreign_mark", [False, True], ids=["plain", "foreign-mark"])
def test_replies_follow_veth0_only_with_steering(netns, backend, family, foreign_mark):
    # Coordinator's exact rule "fwmark 0x1" for the plain case; with another tool's bit also set
    # on the packets the rule must be masked ("fwmark 0x1/0x1") to still match.
    pod, cli, fam = build_pod_and_client(netns, family, "0x1/0x1" if foreign_mark else "0x1")
    add_other_table(pod, foreign_mark)
    other_before = other_table(pod)

    without = replies(pod, cli, fam, family)
    assert without["via_eth0"] >= 20 and without["via_veth0"] == 0

    in_netns(pod, _nft.ensure_reply_steering)
    steered = replies(pod, cli, fam, family)
    assert steered["via_veth0"] >= 20 and steered["via_eth0"] == 0
    # route-tune only touched its own bit: the other tool's bit is still on every reply.
    assert steered["foreign_kept"] == (steered["via_veth0"] if foreign_mark else 0)
    assert not root_has_our_table()

    in_netns(pod, _nft.remove_reply_steering)
    again = replies(pod, cli, fam, family)
    assert again["via_eth0"] >= 20 and again["via_veth0"] == 0
    assert other_table(pod) == other_before
