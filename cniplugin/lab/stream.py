"""Bounded TCP streams between lab namespaces (stdlib only), run inside a namespace like ping.py.

    ip netns exec NS python -I -S stream.py serve [--timeout S] ADDR,PORT ...
    ip netns exec NS python -I -S stream.py send [--timeout S] SRC,DST,PORT,BYTES ...
    ip netns exec NS python -I -S stream.py datagrams SRC,DST,PORT,COUNT ...
    ip netns exec NS python -I -S stream.py reflect [--timeout S] ADDR,PORT,COUNT ...

`serve` listens on every ADDR,PORT, prints `ready` once all listen, echoes everything each
listener's one connection sends, and exits when all connections are done (or at the timeout).
`send` runs one client per spec at the same time: binds SRC (empty = the kernel's choice),
sends BYTES while reading the echo, and prints one JSON list of
`{"src", "dst", "port", "local", "sent", "received", "ok", "error"}` in spec order.
`datagrams` sends COUNT small UDP datagrams per spec and expects no answer (a one-way probe
for paths whose replies the lab does not route); it prints the same list (`sent` = datagrams).
`reflect` listens on every ADDR,PORT for UDP, prints `ready`, sends every datagram back to its
sender (so the answer's way out of the server can be counted even when it never arrives) and
exits once each listener has answered COUNT datagrams (or at the timeout).
"""

from __future__ import annotations

import json
import select
import socket
import sys
import threading
import time

CHUNK = 65536


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _echo(conn: socket.socket, deadline: float) -> None:
    with conn:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([conn], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return
            data = conn.recv(CHUNK)
            if not data:
                return
            conn.sendall(data)


def serve(specs: list[str], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    listeners = []
    for spec in specs:
        addr, port = spec.rsplit(",", 1)
        sock = socket.socket(_family(addr), socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, int(port)))
        sock.listen(1)
        listeners.append(sock)
    print("ready", flush=True)
    threads = []
    pending = list(listeners)
    while pending and time.monotonic() < deadline:
        ready, _, _ = select.select(pending, [], [], max(0.0, deadline - time.monotonic()))
        for sock in ready:
            conn, _ = sock.accept()
            pending.remove(sock)
            sock.close()
            thread = threading.Thread(target=_echo, args=(conn, deadline))
            thread.start()
            threads.append(thread)
    for thread in threads:
        thread.join()
    return 0


def _client(spec: str, timeout: float, out: dict) -> None:
    src, dst, port, size = spec.split(",")
    out.update(src=src, dst=dst, port=int(port), local="", sent=0, received=0, ok=False, error="")
    total = int(size)
    try:
        with socket.socket(_family(dst), socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            if src:
                sock.bind((src, 0))
            sock.connect((dst, int(port)))
            out["local"] = sock.getsockname()[0]

            def reader() -> None:
                while out["received"] < total:
                    data = sock.recv(CHUNK)
                    if not data:
                        break
                    out["received"] += len(data)
            thread = threading.Thread(target=reader)
            thread.start()
            block = b"r" * CHUNK
            while out["sent"] < total:
                n = min(CHUNK, total - out["sent"])
                sock.sendall(block[:n])
                out["sent"] += n
            thread.join(timeout)
            sock.shutdown(socket.SHUT_WR)
            out["ok"] = out["received"] == total
            if not out["ok"]:
                out["error"] = f"echo incomplete: {out['received']} of {total} bytes"
    except OSError as exc:
        out["error"] = str(exc)


def send(specs: list[str], timeout: float) -> int:
    results = [{} for _ in specs]
    threads = [threading.Thread(target=_client, args=(spec, timeout, res)) for spec, res in zip(specs, results)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps(results))
    return 0


def datagrams(specs: list[str], timeout: float) -> int:
    results = []
    for spec in specs:
        src, dst, port, count = spec.split(",")
        out = {"src": src, "dst": dst, "port": int(port), "local": "", "sent": 0, "received": 0,
               "ok": False, "error": ""}
        try:
            with socket.socket(_family(dst), socket.SOCK_DGRAM) as sock:
                if src:
                    sock.bind((src, 0))
                for _ in range(int(count)):  # unconnected: an ICMP error must not end the probe
                    sock.sendto(b"route-tune-lab", (dst, int(port)))
                    out["sent"] += 1
                out["ok"] = True
        except OSError as exc:
            out["error"] = str(exc)
        results.append(out)
    print(json.dumps(results))
    return 0


def reflect(specs: list[str], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    left: dict[socket.socket, int] = {}
    for spec in specs:
        addr, port, count = spec.split(",")
        sock = socket.socket(_family(addr), socket.SOCK_DGRAM)
        sock.bind((addr, int(port)))
        left[sock] = int(count)
    print("ready", flush=True)
    while left and time.monotonic() < deadline:
        ready, _, _ = select.select(list(left), [], [], max(0.0, deadline - time.monotonic()))
        for sock in ready:
            data, peer = sock.recvfrom(CHUNK)
            try:
                sock.sendto(data, peer)
            except OSError:  # no route back is a finding of the counters, not a failure here
                pass
            left[sock] -= 1
            if not left[sock]:
                del left[sock]
                sock.close()
    for sock in left:
        sock.close()
    return 0


def main(argv: list[str]) -> int:
    command, argv = argv[0], argv[1:]
    timeout = 30.0
    if argv[:1] == ["--timeout"]:
        timeout, argv = float(argv[1]), argv[2:]
    return {"serve": serve, "send": send, "datagrams": datagrams,
            "reflect": reflect}[command](argv, timeout)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
