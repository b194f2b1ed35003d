"""A batch ICMP echo client run inside lab namespaces, over ``cniplugin.kernel.echo`` (the one
echo implementation; ``cni-route-tune reach`` uses it too).

The machine has no `ping` binary, and starting one process per probe is slow, so the lab
runs this file once per namespace with many `SRC>DST` pairs:

    ip netns exec NS python -I -S ping.py [--timeout SECONDS] SRC>DST ...

It prints one JSON list: `{"src", "dst", "ok", "rtt_ms", "error"}` per pair, in order.
Each probe binds its raw socket to SRC, so the kernel routes it exactly as an application
bound to that address would (source rules apply).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if not __package__:  # run as a script (python -I -S): the package is two directories up
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cniplugin.kernel.echo import echo_all  # noqa: E402


def probe_all(pairs: list[tuple[str, str]], timeout: float) -> list[dict]:
    """One echo per (src, dst) pair (src "" = the kernel's choice), all in flight at once."""
    results = echo_all(pairs, attempts=1, timeout=timeout)
    return [{"src": src, "dst": dst, "ok": r.answered, "rtt_ms": r.rtt_ms,
             "error": "" if r.answered else r.error} for (src, dst), r in zip(pairs, results)]


def probe(src: str, dst: str, timeout: float) -> dict:
    """One echo from `src` to `dst`, waiting up to `timeout` seconds for the reply."""
    return probe_all([(src, dst)], timeout)[0]


def main(argv: list[str]) -> int:
    timeout = 1.0
    if argv[:1] == ["--timeout"]:
        timeout, argv = float(argv[1]), argv[2:]
    pairs = [(src, dst) for src, _, dst in (pair.partition(">") for pair in argv)]
    print(json.dumps(probe_all(pairs, timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
