"""Requests served in-process, counted in the state dir for the resident engine to export.

A node that runs cold (no engine up, every request in its own interpreter) must show up in
monitoring once an engine runs. The in-process plugin cannot serve metrics, so it leaves a count:
one file per command and result code under ``<stateDir>/requests-in-process/``, grown by one byte
per request with a single ``O_APPEND`` write (atomic between concurrent plugins, no lock, no read),
so a file's size is its count. The engine reads the sizes at scrape time.

Stdlib only and cheap: it runs after every in-process request, whose reply is already decided;
a failure to count is swallowed (counting never fails a request). The result code and the state
dir come from the request as the protocol layer served it (``protocol.dispatch.Outcome``): the
reply is not parsed, and the node defaults file is read again only for a request that failed
before its ``Invocation`` existed (so that it still counts where every other request does).
"""

from __future__ import annotations

import os

__all__ = ["COUNTS_DIR", "counts_dir", "node_state_dir", "code_label", "command_label",
           "record_outcome", "read_counts"]

COUNTS_DIR = "requests-in-process"
#: The commands a request label may name; anything else (a malformed CNI_COMMAND) is "other",
#: so a hostile or broken caller cannot add series.
_COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")


def node_state_dir(environ) -> str:
    """The node's state dir: ``stateDir`` of the node defaults file, else the built-in one (a
    node-only key, so every request of a node counts into the same place)."""
    from cniplugin.protocol.env import read_node_defaults
    from cniplugin.protocol.errors import CNIError
    from cniplugin.records.defaults import node_state_dir as of_values
    try:
        return of_values(read_node_defaults(environ).values)
    except CNIError:
        return of_values({})


def counts_dir(state_dir: str) -> str:
    return os.path.join(state_dir, COUNTS_DIR)


def command_label(command: str) -> str:
    return command if command in _COMMANDS else "other"


def code_label(code: int | None) -> str:
    """"0" for success, else the CNI error code ("other" when there is none, or not a CNI code:
    the labels stay a small fixed set)."""
    if code == 0:
        return "0"
    return str(code) if isinstance(code, int) and 0 < code < 1000 else "other"


def record_outcome(environ, command: str, code: int | None, state_dir: str | None) -> None:
    """Count one in-process request (never raises): ``code`` is its CNI result code (0 for
    success), ``state_dir`` the one its ``Invocation`` used (``Outcome.state_dir``); without one
    (the request failed before it was built), the node's, from the node defaults file."""
    name = f"{command_label(command)}.{code_label(code)}"
    try:
        directory = counts_dir(state_dir or node_state_dir(environ))
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(os.path.join(directory, name), flags, 0o600)
        except FileNotFoundError:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(directory, name), flags, 0o600)
        try:
            os.write(fd, b".")
        finally:
            os.close(fd)
    except OSError:
        pass


def read_counts(state_dir: str) -> dict[tuple[str, str], int]:
    """(command, code) -> requests served in-process, from the file sizes."""
    out: dict[tuple[str, str], int] = {}
    try:
        entries = list(os.scandir(counts_dir(state_dir)))
    except OSError:
        return out
    for entry in entries:
        command, dot, code = entry.name.partition(".")
        if not dot or command_label(command) != command:
            continue
        try:
            size = entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue
        out[(command, code)] = size
    return out
