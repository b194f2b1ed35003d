"""Small helpers of the kernel suites: commands in a netns, route lookups, one echo, replies, and
who answers ARP requests / neighbour solicitations on a segment (``listen_answers``,
``arp_answers``)."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import time
from collections.abc import Callable

from cniplugin.kernel import packets as pk
from cniplugin.lab.ping import probe
from harness.host import in_netns


def sh(*args: str, check: bool = True) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if check and done.returncode:
        raise AssertionError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def nsx(ns: str, *args: str, check: bool = True) -> str:
    return sh("ip", "netns", "exec", ns, *args, check=check)


def ok(done: subprocess.CompletedProcess) -> dict | None:
    """A plugin run that must have succeeded: its JSON result (None when it printed nothing)."""
    assert done.returncode == 0, (done.stdout, done.stderr)
    return json.loads(done.stdout) if done.stdout.strip() else None


def route_get(ns: str, dst: str, src: str = "") -> dict:
    args = ["ip", "-j", "route", "get", dst] + (["from", src] if src else [])
    return json.loads(nsx(ns, *args))[0]


def table_of(ns: str, dst: str, src: str) -> str:
    words = nsx(ns, "ip", "route", "get", dst, "from", src).split()
    return words[words.index("table") + 1] if "table" in words else "main"


def pings(ns: str, dst: str, src: str, timeout: float = 2.0) -> bool:
    """One ICMP echo from ``src`` to ``dst`` inside ``ns`` (the lab's echo client, in-process)."""
    return in_netns(ns, lambda: probe(src, dst, timeout))["ok"]


#: Seconds a listener goes on listening once every expected answer arrived: the window in which
#: an interface that should NOT answer would have (answers arrive within milliseconds).
QUIET_WINDOW = 0.5
#: How long a listener waits for the expected answers: it only keeps a broken run from hanging
#: (``harness.host.wait_until``'s rule), never a bound on how fast an owner answers.
ANSWER_TIMEOUT = 10.0
PACKET_OUTGOING = 4  # sockaddr_ll's pkttype of a frame this host sent

Answers = dict[str, set[str]]


def listen_answers(sock: socket.socket, parse: Callable[[bytes], tuple[str, str] | None],
                   expect: Answers) -> Answers:
    """target -> MACs claiming it, from the frames ``parse`` recognises on ``sock`` (received
    ones only). Listens until every MAC in ``expect`` answered for its target (up to
    ANSWER_TIMEOUT), then QUIET_WINDOW more for anyone else; the caller compares the result."""
    answers: Answers = {}

    def complete() -> bool:
        return all(macs <= answers.get(target, set()) for target, macs in expect.items())

    quiet = complete()
    deadline = time.monotonic() + (QUIET_WINDOW if quiet else ANSWER_TIMEOUT)
    while (left := deadline - time.monotonic()) > 0 and select.select([sock], [], [], left)[0]:
        frame, addr = sock.recvfrom(65535)
        if addr[2] != PACKET_OUTGOING and (hit := parse(frame)):
            answers.setdefault(hit[0], set()).add(hit[1])
            if not quiet and complete():
                quiet, deadline = True, time.monotonic() + QUIET_WINDOW
    return answers  # an expected owner that never answered: the caller's comparison names it


def arp_answers(ns: str, dev: str, sender_ip: str, targets: list[str],
                expect: Answers) -> Answers:
    """From ``dev`` in ``ns``, as ``sender_ip``: one ARP request for each target; target -> MACs
    that answered (``listen_answers``: until every ``expect``ed one did, then a quiet window)."""
    def body() -> Answers:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(pk.ETH_P_ARP)) as sock:
            sock.bind((dev, pk.ETH_P_ARP))
            mac = sock.getsockname()[4]
            for target in targets:
                sock.send(pk.build_arp(pk.ARP_REQUEST, mac, sender_ip, target))

            def parse(frame: bytes) -> tuple[str, str] | None:
                packet = pk.parse_arp(frame)
                if packet and packet.op == pk.ARP_REPLY and str(packet.sender_ip) in targets:
                    return str(packet.sender_ip), pk.mac_to_str(packet.sender_mac)
                return None
            return listen_answers(sock, parse, expect)
    return in_netns(ns, body)
