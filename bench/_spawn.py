"""Process helpers shared by the benchmarks: spawn-to-exit timing, tiny C programs, a resident
engine started and waited for (``start_serve``: chain.py, repair.py, handover.py).

Timing is ``posix_spawn`` to ``wait4`` with stdin/stdout/stderr on memory files, so that a process as
short as sbr's VERSION is not drowned by the measuring side's own pipes and threads.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

TRUE_C = "int main(void) { return 0; }\n"
#: `maxrss PROGRAM ARGS...`: runs PROGRAM (vfork + execve + wait4) and appends its ru_maxrss (KiB)
#: to stderr. C, because a child's ru_maxrss also counts the image it replaced at exec: a child
#: spawned by a Python process would count that process's pages.
MAXRSS_C = r"""
#include <stdio.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
extern char **environ;
int main(int argc, char **argv) {
    if (argc < 2) return 127;
    pid_t pid = vfork();
    if (pid == 0) {
        execve(argv[1], argv + 1, environ);
        _exit(127);
    }
    int status;
    struct rusage ru;
    if (pid < 0 || wait4(pid, &status, 0, &ru) < 0) return 127;
    dprintf(2, "\nmaxrss-kib %ld\n", ru.ru_maxrss);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
"""


@dataclass
class Finished:
    ms: float  #: wall time, spawn to exit
    exit_code: int
    stdout: bytes
    stderr: bytes


class Spawner:
    """Runs one process at a time per thread: stdin from bytes (or /dev/null), output captured."""

    def __init__(self) -> None:
        self.local = threading.local()

    def _fds(self) -> tuple[int, int, int]:
        if not hasattr(self.local, "fds"):
            self.local.fds = (os.memfd_create("in"), os.memfd_create("out"), os.memfd_create("err"))
        return self.local.fds

    def run(self, argv: list[str], env: dict[str, str], stdin: bytes | None = None) -> Finished:
        fd_in, fd_out, fd_err = self._fds()
        for fd in (fd_in, fd_out, fd_err):
            os.ftruncate(fd, 0)
        if stdin is None:
            actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)]
        else:
            os.pwrite(fd_in, stdin, 0)
            os.lseek(fd_in, 0, os.SEEK_SET)
            actions = [(os.POSIX_SPAWN_DUP2, fd_in, 0)]
        for fd in (fd_out, fd_err):
            os.lseek(fd, 0, os.SEEK_SET)
        actions += [(os.POSIX_SPAWN_DUP2, fd_out, 1), (os.POSIX_SPAWN_DUP2, fd_err, 2)]
        start = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
        _, status, _ = os.wait4(pid, 0)
        elapsed = (time.perf_counter() - start) * 1000
        return Finished(elapsed, os.waitstatus_to_exitcode(status), _read_all(fd_out), _read_all(fd_err))


def _read_all(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size, 0)


def compile_c(source: str, binary: Path) -> bool:
    """Compile `source` to `binary`, statically if the C library allows it; True if static."""
    src = binary.with_suffix(".c")
    src.write_text(source)
    for static in (["-static"], []):
        proc = subprocess.run(["cc", "-O2", "-s", *static, "-o", str(binary), str(src)],
                              capture_output=True, text=True)
        if proc.returncode == 0:
            return bool(static)
    raise RuntimeError(f"cannot compile {src}: {proc.stderr}")


def maxrss_runner(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    compile_c(MAXRSS_C, directory / "maxrss")
    return directory / "maxrss"


def peak_rss_mib(runner: Path, spawner: Spawner, argv: list[str], env: dict[str, str],
                 stdin: bytes | None = None) -> float:
    """ru_maxrss of one run of argv (MiB), through `runner` (maxrss_runner); raises on failure."""
    done = spawner.run([str(runner), *argv], env, stdin)
    head, _, tail = done.stderr.rpartition(b"\nmaxrss-kib ")
    if done.exit_code != 0 or not tail:
        raise RuntimeError(f"{argv[:4]} failed: {done.stdout[-2000:]!r} {head[-2000:]!r}")
    return int(tail) / 1024


def static_true(directory: Path) -> tuple[Path, bool]:
    """A `true` of our own, static like the native forwarder: the floor of a C process start."""
    directory.mkdir(parents=True, exist_ok=True)
    binary = directory / "static-true"
    return binary, compile_c(TRUE_C, binary)


def start_serve(cni_route_tune: Path, socket: str | os.PathLike, *args: str, env: dict[str, str],
                log: Path, ready: Path | None = None, wrapper: tuple[str, ...] = (),
                timeout: float = 60.0, poll: float = 0.02) -> subprocess.Popen:
    """Start ``[*wrapper] cni-route-tune serve --socket SOCKET *args`` (stdout and stderr appended
    to ``log``) and return it once ``ready`` (default: the socket) exists. Raises RuntimeError
    with the log's tail if the engine exits first or is not ready within ``timeout`` seconds."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([*wrapper, str(cni_route_tune), "serve", "--socket", str(socket), *args],
                                env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    ready = Path(socket) if ready is None else ready
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            what = (f"exited {proc.returncode}" if proc.returncode is not None
                    else f"did not serve within {timeout:g} s")
            if proc.returncode is None:
                proc.kill()
                proc.wait()
            raise RuntimeError(f"cni-route-tune serve {what}: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(poll)
    return proc
