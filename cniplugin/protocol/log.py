"""Logging: free-form lines on stderr, JSON lines in a rotated file, per-request context.

- stderr gets WARNING and above (``ROUTE_TUNE_LOG_STDERR_LEVEL`` may lower it, e.g. ``debug``);
  tracebacks appear there only at DEBUG. stdout is never touched: it belongs to the CNI reply.
- The file follows the request's ``logOptions`` (coordinator's names: ``logLevel``, ``logFile``,
  ``logMaxSize`` MiB, ``logMaxAge`` days, ``logMaxCount`` backups). Each line is one JSON object with
  ``ts, level, msg, containerID, netns, ifname, podNamespace, podName, command`` (+ ``error``).
- Many short-lived plugin processes append to the same file, so every write takes an ``flock`` on
  the open file, re-checks that the fd is still the file at ``logFile`` (another process may have
  rotated it: then re-open by path), rotates ``f -> f.1 -> ... -> f.<maxCount>`` when the line would
  exceed ``logMaxSize``, and writes the line with one ``write()`` on an O_APPEND fd.
- The request context (identity + options) lives in a ``ContextVar``: one value per process for
  the plugin, one per request thread in a resident server.

``logFile`` comes from a NetworkAttachmentDefinition a namespace tenant can write, so it must
resolve (symlinks and ``..`` included) to a file under the node's ``logDir``.
"""

from __future__ import annotations

import contextvars
import fcntl
import json
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager  # loaded anyway: logging -> traceback -> contextlib

from cniplugin.protocol.env import Record, parse_cni_args
from cniplugin.protocol.errors import InvalidConfig

# No ``dataclasses`` or ``typing`` at run time: the light commands (DEL of a gone
# netns) set up logging too, and those imports cost more than the rest of such a command.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Iterator, Mapping

__all__ = [
    "LOGGER_NAME", "LogOptions", "resolve_log_options", "effective_log_options", "setup",
    "request_context", "request_fields", "note_request", "set_request_options", "get_logger",
    "RotatingJsonFile",
]

LOGGER_NAME = "cniplugin"
STDERR_LEVEL_ENV = "ROUTE_TUNE_LOG_STDERR_LEVEL"
DEFAULT_LOG_DIR = "/var/log/route-tune"
DEFAULT_LOG_FILE = "route-tune.log"

#: coordinator (zap) level names, plus Python's spellings.
LEVELS = {
    "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
    "warning": logging.WARNING, "error": logging.ERROR, "dpanic": logging.CRITICAL,
    "panic": logging.CRITICAL, "fatal": logging.CRITICAL,
}
_LINE_LEVEL = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn",
               logging.ERROR: "error", logging.CRITICAL: "fatal"}
_MIB = 1024 * 1024


class LogOptions(Record):
    """Resolved ``logOptions``: ``file`` is the real path under ``logDir``; sizes in bytes."""

    _fields = ("level", "file", "max_bytes", "max_count", "max_age_days")
    _defaults = {"level": logging.INFO, "file": os.path.join(DEFAULT_LOG_DIR, DEFAULT_LOG_FILE),
                 "max_bytes": 100 * _MIB, "max_count": 10, "max_age_days": 30}
    level: int
    file: str
    max_bytes: int
    max_count: int
    max_age_days: int


def _option_int(options: dict, key: str, default: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidConfig(f"key `logOptions.{key}`: value `{value}` is not valid; "
                            "expected an integer >= 0")
    return value or default


def resolve_log_file(log_file: Any, log_dir: str) -> str:
    """The real path of ``log_file`` (absolute, or relative to ``log_dir``) if it is under ``log_dir``.

    Raises ``InvalidConfig`` (7) for anything that resolves elsewhere: absolute paths outside,
    ``..`` escapes, symlinks pointing out, or the directory itself.
    """
    if not isinstance(log_file, str) or not log_file or "\0" in log_file:
        raise InvalidConfig(f"key `logOptions.logFile`: value `{log_file}` is not valid; "
                            f"expected a file name under {log_dir}")
    real_dir = os.path.realpath(log_dir)
    real_file = os.path.realpath(os.path.join(real_dir, log_file))
    if os.path.commonpath([real_dir, real_file]) != real_dir or real_file == real_dir:
        raise InvalidConfig(f"key `logOptions.logFile`: value `{log_file}` is not allowed; "
                            f"expected a file under the node's log directory {log_dir}",
                            "logDir can only be changed in the node defaults file")
    return real_file


def resolve_log_options(raw: Any, log_dir: str = DEFAULT_LOG_DIR) -> LogOptions:
    """Validate a ``logOptions`` object (None = all defaults) into ``LogOptions``; raises code 7.

    0 for ``logMaxSize`` or ``logMaxCount`` means the default (100 MiB, 10 backups), as in
    lumberjack; ``logMaxAge: 0`` keeps backups regardless of age.
    """
    options = raw if raw is not None else {}
    if not isinstance(options, dict):
        raise InvalidConfig(f"key `logOptions`: value `{raw}` is not valid; expected an object")
    level_name = options.get("logLevel", "info")
    if not isinstance(level_name, str) or level_name.lower() not in LEVELS:
        raise InvalidConfig(f"key `logOptions.logLevel`: value `{level_name}` is not valid; "
                            "expected one of debug, info, warn, error")
    max_age = options.get("logMaxAge", 30)
    if isinstance(max_age, bool) or not isinstance(max_age, int) or max_age < 0:
        raise InvalidConfig(f"key `logOptions.logMaxAge`: value `{max_age}` is not valid; "
                            "expected an integer >= 0")
    return LogOptions(
        level=LEVELS[level_name.lower()],
        file=resolve_log_file(options.get("logFile", DEFAULT_LOG_FILE), log_dir),
        max_bytes=_option_int(options, "logMaxSize", 100) * _MIB,
        max_count=_option_int(options, "logMaxCount", 10),
        max_age_days=max_age,
    )


def effective_log_options(node_values: dict, request_options: Any = None) -> LogOptions:
    """The one derivation of the effective ``logOptions``: the node defaults file's, overridden key
    by key by the request's, resolved under the node's ``logDir``. ``dispatch`` calls it before the
    config model loads (so the file log works for the light DEL and for 999s); ``PluginConfig``'s
    validator calls it too. An empty or missing object means "no options"."""
    merged: dict = {}
    for options in (node_values.get("logOptions"), request_options):
        if not options:
            continue
        if not isinstance(options, dict):
            raise InvalidConfig(f"key `logOptions`: value `{options}` is not valid; expected an "
                                "object such as {\"logLevel\": \"info\"}")
        merged.update(options)
    return resolve_log_options(merged, node_values.get("logDir", DEFAULT_LOG_DIR))


class RotatingJsonFile:
    """Append lines to one path; size rotation safe across processes (flock) and threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()

    def write(self, data: bytes, max_bytes: int, max_count: int, max_age_days: int = 0) -> None:
        """Append ``data`` (one whole line), rotating first if it would exceed ``max_bytes``."""
        with self._lock:
            # Each pass either writes, or notices that the file moved (rotated by someone else or
            # by us) and re-opens by path. A bounded number of passes keeps a pathological race
            # from spinning; the last pass writes without rotating.
            for attempt in range(16):
                fd = self._open()
                fcntl.flock(fd, fcntl.LOCK_EX)
                if not self._is_current(fd):
                    self._close()
                    continue
                size = os.fstat(fd).st_size
                if attempt < 15 and max_bytes and size and size + len(data) > max_bytes:
                    self._rotate(max_count, max_age_days)
                    self._close()  # closing releases the lock on the now-rotated inode
                    continue
                try:
                    os.write(fd, data)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                return

    def close(self) -> None:
        with self._lock:
            self._close()

    def _open(self) -> int:
        if self._fd is None:
            directory = os.path.dirname(self.path)
            if not os.path.isdir(directory):
                os.makedirs(directory, mode=0o750, exist_ok=True)
            # O_NOFOLLOW: a symlink planted after the config was validated is not followed.
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                               | os.O_CLOEXEC, 0o640)
        return self._fd

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _is_current(self, fd: int) -> bool:
        try:
            on_disk = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)

    def _rotate(self, max_count: int, max_age_days: int) -> None:
        """``f.{n-1} -> f.n``, ..., ``f -> f.1``; drop backups beyond ``max_count`` or too old.

        Runs only while holding the lock of the current file, and the final rename is the last
        step, so two processes never shuffle backups at the same time.
        """
        backups = self._backups()
        cutoff = time.time() - max_age_days * 86400 if max_age_days else None
        for index, name in backups:
            too_old = cutoff is not None and _mtime(name) < cutoff
            if index >= max_count or too_old:
                _unlink(name)
        for index in range(max_count - 1, 0, -1):
            source = f"{self.path}.{index}"
            if os.path.lexists(source):
                os.replace(source, f"{self.path}.{index + 1}")
        if max_count:
            os.replace(self.path, f"{self.path}.1")
        else:
            _unlink(self.path)

    def _backups(self) -> list[tuple[int, str]]:
        directory, base = os.path.split(self.path)
        found = []
        for name in os.listdir(directory):
            suffix = name[len(base) + 1:]
            if name.startswith(base + ".") and suffix.isdigit():
                found.append((int(suffix), os.path.join(directory, name)))
        return sorted(found)


def _mtime(path: str) -> float:
    try:
        return os.stat(path, follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return time.time()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _RequestContext:
    __slots__ = ("fields", "options")

    def __init__(self, fields: dict | None = None, options: LogOptions | None = None) -> None:
        self.fields = {} if fields is None else fields
        self.options = options


#: The context outside any request (the CLI, a server's own lines): never written to.
_NO_REQUEST = _RequestContext()
_context: contextvars.ContextVar[_RequestContext] = contextvars.ContextVar(
    "route_tune_log_context", default=_NO_REQUEST)
_files: dict[str, RotatingJsonFile] = {}
_files_lock = threading.Lock()


def _file_for(path: str) -> RotatingJsonFile:
    with _files_lock:
        handle = _files.get(path)
        if handle is None:
            handle = _files[path] = RotatingJsonFile(path)
        return handle


class _JsonFileHandler(logging.Handler):
    """Writes each record to the current request's ``logFile`` at its ``logLevel``."""

    def emit(self, record: logging.LogRecord) -> None:
        ctx = _context.get()
        options = ctx.options
        if options is None or record.levelno < options.level:
            return
        try:
            line = {"ts": _timestamp(record.created),
                    "level": _LINE_LEVEL.get(record.levelno, record.levelname.lower()),
                    "msg": record.getMessage(), **ctx.fields, "logger": record.name,
                    "pid": record.process}
            if record.exc_info:
                line["error"] = logging.Formatter().formatException(record.exc_info)
            data = (json.dumps(line, ensure_ascii=False, default=str) + "\n").encode()
            _file_for(options.file).write(data, options.max_bytes, options.max_count,
                                          options.max_age_days)
        except Exception as exc:  # a broken log file must never break the CNI reply
            sys.stderr.write(f"route-tune: cannot write log file {options.file}: {exc}\n")


class _StderrFormatter(logging.Formatter):
    """``route-tune[pid] LEVEL msg (containerID=.. ifname=..)``; tracebacks only at DEBUG."""

    def __init__(self, show_tracebacks: bool) -> None:
        super().__init__()
        self.show_tracebacks = show_tracebacks

    def format(self, record: logging.LogRecord) -> str:
        fields = _context.get().fields
        where = " ".join(f"{k}={fields[k]}" for k in ("command", "containerID", "ifname")
                         if fields.get(k))
        text = f"route-tune[{record.process}] {record.levelname} {record.getMessage()}"
        if where:
            text += f" ({where})"
        if record.exc_info and self.show_tracebacks:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + \
        f".{int(created % 1 * 1000):03d}Z"


_setup_done = False


def setup(environ: dict | None = None) -> logging.Logger:
    """Install the stderr and JSON-file handlers on the ``cniplugin`` logger (idempotent)."""
    global _setup_done
    logger = logging.getLogger(LOGGER_NAME)
    if _setup_done:
        return logger
    environ = os.environ if environ is None else environ
    stderr_level = LEVELS.get(environ.get(STDERR_LEVEL_ENV, "").lower(), logging.WARNING)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(stderr_level)
    stderr.setFormatter(_StderrFormatter(show_tracebacks=stderr_level <= logging.DEBUG))
    logger.addHandler(stderr)
    logger.addHandler(_JsonFileHandler(logging.DEBUG))
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    _setup_done = True
    return logger


@contextmanager
def request_context(fields: dict, options: LogOptions | None) -> Iterator[None]:
    """Bind the request identity and its log options for the duration of a request.

    ``fields`` is kept by reference: the caller may add to it as it learns more (pod name, ...).
    """
    token = _context.set(_RequestContext(fields, options))
    try:
        yield
    finally:
        _context.reset(token)


def request_fields(environ: Mapping[str, str], args=None) -> dict:
    """The request identity every log line of a request carries, from its CNI_* variables
    (``args``: ``CNI_ARGS`` already parsed, else parsed here)."""
    if args is None:
        args = parse_cni_args(environ.get("CNI_ARGS", ""))
    return {"containerID": environ.get("CNI_CONTAINERID", ""),
            "netns": environ.get("CNI_NETNS", ""), "ifname": environ.get("CNI_IFNAME", ""),
            "podNamespace": args.pod_namespace, "podName": args.pod_name,
            "command": environ.get("CNI_COMMAND", "")}


def note_request(environ: Mapping[str, str], args=None) -> None:
    """Add the request identity to the bound request context (none bound: nothing to do)."""
    ctx = _context.get()
    if ctx is not _NO_REQUEST:
        ctx.fields.update(request_fields(environ, args))


def set_request_options(options: LogOptions | None) -> None:
    """Set the bound request's file options once the config is known (none bound, as in the
    CLI: nothing to do)."""
    ctx = _context.get()
    if ctx is not _NO_REQUEST:
        ctx.options = options


def get_logger(name: str = LOGGER_NAME) -> logging.Logger:
    """A logger under ``cniplugin`` (modules may also use ``logging.getLogger(__name__)``)."""
    return logging.getLogger(name)
