"""Underlay reply steering: route-tune's own nftables table (``table inet route_tune``).

Coordinator marks connections that enter the pod through ``veth0`` and restores that mark on
their locally generated packets, so the policy rule ``fwmark 0x1 lookup 100`` sends the replies
back through ``veth0`` (iptables mangle, coordinator-behaviour §2.3). route-tune does the same
with one nftables table it owns; nothing outside that table is ever listed, flushed or edited::

    table inet route_tune {
        chain prerouting {                  # a NEW connection in through veth0: remember it
            type filter hook prerouting priority mangle; policy accept;
            iifname "veth0" ct state new ct mark set ct mark | 0x00000001 counter
        }
        chain output {                      # its replies: restore our bit, the kernel re-routes
            type route hook output priority mangle; policy accept;
            ct mark & 0x00000001 == 0x00000001 meta mark set meta mark | 0x00000001 counter
        }
    }

Only the bits in ``mask`` are read or written (default mark 0x1 within mask 0x1), so marks set by
other tools (Istio, kube-proxy, Cilium) keep their other bits. Unlike coordinator the incoming
packet's own mark is left alone: only the conntrack mark is needed to steer the replies.

Backends: ``libnftables.so.1`` through ctypes (loaded lazily, on first use). Its netlink socket is
opened by ``nft_ctx_new`` in the *calling thread's* netns, so a resident-server thread that has
``setns``'d into the pod needs no fork. If the library cannot be loaded, ``nft -f -`` runs as a
subprocess (a child forked from that thread inherits the thread's netns too).
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from cniplugin.protocol.errors import NetfilterError

if TYPE_CHECKING:  # ctypes and subprocess are imported on first use: start-up cost matters
    import ctypes

__all__ = [
    "TABLE", "FAMILY", "DEFAULT_MARK", "DEFAULT_MASK", "ensure_reply_steering",
    "remove_reply_steering", "read_reply_steering", "expected_reply_steering",
]

TABLE = "route_tune"
FAMILY = "inet"
DEFAULT_MARK = 0x1
#: Only bit 0 is ours: coordinator's mark value, without clobbering anyone else's bits.
DEFAULT_MASK = 0x1

_U32 = 0xFFFFFFFF
_LIBRARY = "libnftables.so.1"
_NFT_BINARY = ("/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft")
_OUTPUT_STATELESS = 1 << 2  # NFT_CTX_OUTPUT_STATELESS: hide counter values (CHECK compares text)
# strerror() texts, C locale (nobody sets LC_MESSAGES in our processes; the binary gets LC_ALL=C).
_ENOENT_TEXT = "No such file or directory"
_EEXIST_TEXT = "File exists"
_IFNAME_FORBIDDEN = set('/"\\') | {chr(c) for c in range(33)} | {chr(127)}


# --- the ruleset -------------------------------------------------------------------------------

def _check(ifname: str, mark: int, mask: int) -> None:
    if not (0 < len(ifname) <= 15) or set(ifname) & _IFNAME_FORBIDDEN or ifname in (".", ".."):
        raise ValueError(f"invalid interface name {ifname!r}")
    for name, value in (("mark", mark), ("mask", mask)):
        if not isinstance(value, int) or not 0 < value <= _U32:
            raise ValueError(f"{name} must be in 1..0xffffffff, got {value!r}")
    if mark & ~mask:
        raise ValueError(f"mark {mark:#x} has bits outside mask {mask:#x}")


def _set_expr(key: str, mark: int, mask: int) -> str:
    # Written exactly as nft 1.0.6 prints ``key & ~mask | mark`` back, so the text read back after
    # ensure equals the text we sent (the kernel stores it as (x & (~mask|mark)) ^ mark).
    keep = (~mask | mark) & _U32
    if keep == _U32:
        return f"{key} | 0x{mark:08x}"
    return f"{key} & 0x{keep:08x} | 0x{mark:08x}"


def _match_expr(key: str, mark: int, mask: int) -> str:
    if mask == _U32:
        return f"{key} 0x{mark:08x}"
    return f"{key} & 0x{mask:08x} == 0x{mark:08x}"


def expected_reply_steering(ifname: str = "veth0", mark: int = DEFAULT_MARK,
                            mask: int = DEFAULT_MASK) -> str:
    """The text ``read_reply_steering()`` returns right after ``ensure_reply_steering`` (CHECK)."""
    _check(ifname, mark, mask)
    return (
        f"table {FAMILY} {TABLE} {{\n"
        "\tchain prerouting {\n"
        "\t\ttype filter hook prerouting priority mangle; policy accept;\n"
        f'\t\tiifname "{ifname}" ct state new ct mark set {_set_expr("ct mark", mark, mask)}'
        " counter\n"
        "\t}\n"
        "\n"
        "\tchain output {\n"
        "\t\ttype route hook output priority mangle; policy accept;\n"
        f"\t\t{_match_expr('ct mark', mark, mask)} meta mark set"
        f" {_set_expr('meta mark', mark, mask)} counter\n"
        "\t}\n"
        "}\n"
    )


# --- public operations -------------------------------------------------------------------------

# "table X" creates it when absent, so the following delete never fails: one atomic batch that
# converges whether or not an earlier ADD (or a half-finished one) left a table behind.
_REPLACE = f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"


def ensure_reply_steering(ifname: str = "veth0", mark: int = DEFAULT_MARK,
                          mask: int = DEFAULT_MASK) -> None:
    """(Re)create route-tune's table in the calling thread's netns; idempotent.

    Any deletion (or aborted batch) makes the kernel wait for an RCU grace period, so the
    common cases avoid one: an identical table is left alone (a read) and an absent one is
    created with ``create table``. Anything else (a drifted table, or a creation race) gets
    the replace batch: delete and recreate in one transaction. A rejected batch is aborted
    as a whole by the kernel, so the previous state (if any) stays in place.
    """
    wanted = expected_reply_steering(ifname, mark, mask)
    current = read_reply_steering()
    if current == wanted:
        return
    if current is None:
        try:
            _run(f"create table {FAMILY} {TABLE}\n{wanted}", "apply reply steering")
            return
        except NetfilterError as exc:
            if _EEXIST_TEXT not in exc.details:
                raise
            # It appeared since our read (a concurrent writer): converge with the replace batch.
    _run(_REPLACE + wanted, "apply reply steering")


def remove_reply_steering() -> None:
    """Delete route-tune's table (and only it) in the calling thread's netns; absent is fine."""
    # Look first: even a rejected (ENOENT) delete batch costs a grace period in the kernel.
    if read_reply_steering() is None:
        return
    try:
        _run(f"delete table {FAMILY} {TABLE}\n", "remove reply steering")
    except NetfilterError as exc:
        if _ENOENT_TEXT not in exc.details:
            raise


def read_reply_steering() -> str | None:
    """Our table as nft prints it (counter values hidden), or None when it does not exist."""
    try:
        return _run(f"list table {FAMILY} {TABLE}\n", "read reply steering", stateless=True)
    except NetfilterError as exc:
        if _ENOENT_TEXT in exc.details:
            return None
        raise


# --- backends ----------------------------------------------------------------------------------

def _run(commands: str, what: str, *, stateless: bool = False) -> str:
    """Run an nft command buffer in the calling thread's netns; returns nft's output text."""
    lib = _library()
    if lib is not None:
        rc, out, err = lib.run(commands, stateless)
    else:
        rc, out, err = _run_binary(commands, stateless)
    if rc != 0:
        raise NetfilterError(f"nftables: cannot {what}", err.strip())
    return out


class _LibNftables:
    """Thin ctypes binding of the few libnftables calls we need."""

    def __init__(self, dll: ctypes.CDLL) -> None:
        import ctypes

        self._dll = dll
        dll.nft_ctx_new.restype = ctypes.c_void_p
        dll.nft_ctx_new.argtypes = [ctypes.c_uint32]
        dll.nft_ctx_free.restype = None
        dll.nft_ctx_free.argtypes = [ctypes.c_void_p]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(dll, name).restype = ctypes.c_int
            getattr(dll, name).argtypes = [ctypes.c_void_p]
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(dll, name).restype = ctypes.c_char_p
            getattr(dll, name).argtypes = [ctypes.c_void_p]
        dll.nft_ctx_output_set_flags.restype = None
        dll.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        dll.nft_run_cmd_from_buffer.restype = ctypes.c_int
        dll.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        # libnftables does not promise thread safety (process-wide parser/GMP state): one call at
        # a time. Calls are short (docs/nft.md), so the resident server hardly notices.
        self._lock = threading.Lock()

    def run(self, commands: str, stateless: bool) -> tuple[int, str, str]:
        with self._lock:
            # A fresh context per call: nft_ctx_new opens the netlink socket, and it must be
            # opened in the netns the calling thread is in *now*.
            ctx = self._dll.nft_ctx_new(0)
            if not ctx:
                return 1, "", "nft_ctx_new failed"
            try:
                self._dll.nft_ctx_buffer_output(ctx)
                self._dll.nft_ctx_buffer_error(ctx)
                if stateless:
                    self._dll.nft_ctx_output_set_flags(ctx, _OUTPUT_STATELESS)
                rc = self._dll.nft_run_cmd_from_buffer(ctx, commands.encode())
                out = (self._dll.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
                err = (self._dll.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
            finally:
                self._dll.nft_ctx_free(ctx)
        return rc, out, err


_lib_state: list[_LibNftables | None] = []  # empty = not tried yet; [None] = unavailable
_lib_init = threading.Lock()


def _library() -> _LibNftables | None:
    """The libnftables binding, loaded on first use (start-up cost matters); None if missing."""
    if not _lib_state:
        with _lib_init:
            if not _lib_state:
                import ctypes

                try:
                    _lib_state.append(_LibNftables(ctypes.CDLL(_LIBRARY)))
                except (OSError, AttributeError):  # not installed / too old a version
                    _lib_state.append(None)
    return _lib_state[0]


def _run_binary(commands: str, stateless: bool) -> tuple[int, str, str]:
    """Fallback: ``nft -f -``; the child inherits the calling thread's netns."""
    import subprocess

    nft = next((p for p in _NFT_BINARY if os.access(p, os.X_OK)), None)
    if nft is None:
        return 1, "", f"neither {_LIBRARY} nor an nft binary is available"
    argv = [nft, *(["-s"] if stateless else []), "-f", "-"]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}  # C locale: ENOENT text match
    proc = subprocess.run(argv, input=commands, capture_output=True, text=True, env=env,
                          check=False)
    return proc.returncode, proc.stdout, proc.stderr
