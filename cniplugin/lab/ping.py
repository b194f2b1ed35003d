"""A tiny batch ICMP echo client (stdlib only), run inside a lab namespace.

The machine has no `ping` binary, and starting one process per probe is slow, so the lab
runs this file once per namespace with many `SRC>DST` pairs:

    ip netns exec NS python -I -S ping.py [--timeout SECONDS] SRC>DST ...

It prints one JSON list: `{"src", "dst", "ok", "rtt_ms", "error"}` per pair, in order.
Each probe binds its raw socket to SRC, so the kernel routes it exactly as an application
bound to that address would (source rules apply).
"""

from __future__ import annotations

import ipaddress
import json
import os
import select
import socket
import struct
import sys
import time

ECHO_REQUEST = {4: 8, 6: 128}
ECHO_REPLY = {4: 0, 6: 129}


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def probe(src: str, dst: str, timeout: float, ident: int, seq: int) -> dict:
    """Send one echo request from `src` to `dst` and wait for the matching reply."""
    family = ipaddress.ip_address(dst).version
    af, proto = (socket.AF_INET, socket.IPPROTO_ICMP) if family == 4 else (socket.AF_INET6, socket.IPPROTO_ICMPV6)
    out = {"src": src, "dst": dst, "ok": False, "rtt_ms": None, "error": ""}
    try:
        sock = socket.socket(af, socket.SOCK_RAW, proto)
    except OSError as exc:
        out["error"] = str(exc)
        return out
    with sock:
        payload = b"route-tune-lab" + struct.pack("!d", time.time())
        header = struct.pack("!BBHHH", ECHO_REQUEST[family], 0, 0, ident, seq)
        # IPv6: the kernel fills in the ICMPv6 checksum (it needs the pseudo header).
        csum = _checksum(header + payload) if family == 4 else 0
        packet = struct.pack("!BBHHH", ECHO_REQUEST[family], 0, csum, ident, seq) + payload
        try:
            if src:
                sock.bind((src, 0))
            start = time.monotonic()
            sock.sendto(packet, (dst, 0))
        except OSError as exc:
            out["error"] = str(exc)
            return out
        deadline = start + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            data, addr = sock.recvfrom(4096)
            icmp = data[(data[0] & 0x0F) * 4:] if family == 4 else data
            if len(icmp) < 8 or ipaddress.ip_address(addr[0].split("%")[0]) != ipaddress.ip_address(dst):
                continue
            kind, _, _, r_ident, r_seq = struct.unpack("!BBHHH", icmp[:8])
            if kind == ECHO_REPLY[family] and r_ident == ident and r_seq == seq:
                out["ok"] = True
                out["rtt_ms"] = round((time.monotonic() - start) * 1000, 3)
                return out
        out["error"] = "timeout"
    return out


def main(argv: list[str]) -> int:
    timeout = 1.0
    if argv[:1] == ["--timeout"]:
        timeout, argv = float(argv[1]), argv[2:]
    ident = os.getpid() & 0xFFFF
    results = []
    for seq, pair in enumerate(argv, start=1):
        src, _, dst = pair.partition(">")
        results.append(probe(src, dst, timeout, ident, seq))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
