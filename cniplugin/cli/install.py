"""`cni-route-tune install`: put a self-contained route-tune runtime on a node, then flip the shim.

Most nodes (Talos, Flatcar, minimal images) have no usable Python, and the node's Python is not
ours anyway. So the install copies a whole runtime -- interpreter, standard library and the
site-packages route-tune needs -- into a versioned directory, and only then replaces the small
``#!/bin/sh`` shim that the container runtime executes as ``<cni-bin-dir>/route-tune``::

    <runtime-dir>/<version>/bin/python3
    <runtime-dir>/<version>/lib/python3.X/...               (stdlib, lib-dynload)
    <runtime-dir>/<version>/lib/python3.X/site-packages/    (cniplugin, pyroute2, pydantic, ...)
    <runtime-dir>/<version>/.route-tune-runtime.json        (marker: digest of the tree)
    <cni-bin-dir>/route-tune                                (shim, flipped last)

Order and atomicity:
1. Take an flock on ``<runtime-dir>`` (concurrent installs serialise; no lock file is left).
   Holding it, every ``*.tmp-*`` left behind is stale (a killed install) and is removed.
2. Copy into ``<version>.tmp-<pid>``, self-test the copied interpreter, write the marker, sync,
   rename to ``<version>``. A version dir therefore either is complete or does not exist.
3. Write the shim to ``.route-tune.tmp-<pid>`` in the CNI bin dir, chmod 0755, fsync, then
   ``os.replace`` onto ``route-tune``. Running plugin processes keep their old inode; a new exec
   sees the old or the new shim, never a partial one. ETXTBSY is retried.
4. Install the node defaults file only when absent (an operator's edits are never overwritten)
   unless asked to replace it.
5. Prune runtime versions beyond ``keep`` (the new one and the one the old shim pointed at stay).

Path safety (the chosen policy): the CNI bin dir must already exist and be a real directory, and
the runtime dir must be a real directory (created when absent). A symlink in either place is
refused: inside the install container a host symlink resolves against the *container's* tree, so
following it would write somewhere the node never looks. Symlinks inside a source runtime must be
relative and stay inside it, for the same reason.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from cniplugin.cli.runtime_tree import MARKER, InstallError, Source, copy_tree, is_complete, \
    source_from_interpreter, source_from_tree, tree_digest

__all__ = ["InstallError", "InstallReport", "install", "main", "build_parser", "MARKER"]

SHIM_NAME = "route-tune"
DEFAULT_CNI_BIN_DIR = "/opt/cni/bin"
DEFAULT_RUNTIME_DIR = "/opt/route-tune"
DEFAULT_DEFAULTS_DEST = "/etc/cni/route-tune/defaults.json"
DEFAULT_KEEP = 2

_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_SHIM_VERSION_RE = re.compile(rb"^# route-tune-runtime-version: (\S+)$", re.M)
_SHIM_SCAN = 8 << 20   # a static forwarder is under 1 MiB; a script shim a few hundred bytes
#: What <cni-bin-dir>/route-tune is: the native forwarder (no interpreter start when the
#: resident engine serves), a #!/bin/sh script, or auto: native when the source runtime ships a
#: forwarder built for this node path and version or a C compiler is found, else the script.
FORWARDERS = ("auto", "native", "script")
#: Where an image's runtime ships its prebuilt forwarder (conf/Containerfile builds it).
PREBUILT_FORWARDER = "bin/route-tune-forwarder"
_ETXTBSY_TRIES = 50


@dataclass
class InstallReport:
    """What an install did (or, with dry_run, would do)."""

    version: str
    runtime_path: str
    shim_path: str
    dry_run: bool = False
    actions: list[str] = field(default_factory=list)
    changed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        if not self.changed and not self.dry_run:
            return f"route-tune {self.version} is already installed; nothing changed"
        head = "plan" if self.dry_run else "installed"
        return f"route-tune {self.version} {head}:\n" + "\n".join(f"  {a}" for a in self.actions)


def _self_test(vdir: Path, site_rel: str) -> str:
    """Run the copied interpreter the way the shim will; return cniplugin's version."""
    from cniplugin.transport.native import ENTRY_MODULE
    code = (f"import sys;sys.path.append({str(vdir / site_rel)!r});"
            "import importlib.util as u;import cniplugin._version as v;"
            f"assert u.find_spec({ENTRY_MODULE!r}), 'no {ENTRY_MODULE}';print(v.__version__)")
    proc = subprocess.run([str(vdir / "bin/python3"), "-I", "-S", "-c", code],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    if proc.returncode != 0:
        raise InstallError(f"the copied runtime does not start: {proc.stderr.strip()[-500:]}")
    return proc.stdout.strip()


def _shim_bytes(host_vdir: str, version: str, source: Source, forwarder: str) -> tuple[bytes, str]:
    """What the runtime executes, and which kind it is: the native forwarder (the source
    runtime's prebuilt one when it was built for exactly this node path and version, else
    compiled here) or a ``#!/bin/sh`` script; both run the same in-process program."""
    from cniplugin.transport import native
    if forwarder not in FORWARDERS:
        raise InstallError(f"forwarder must be one of {', '.join(FORWARDERS)}, got {forwarder!r}")
    inputs = {"python": f"{host_vdir}/bin/python3",
              "paths": [f"{host_vdir}/{source.site_rel}"], "version": version}
    if forwarder != "script":
        prebuilt = next((e.src for e in source.entries if e.rel == PREBUILT_FORWARDER), None)
        if prebuilt is not None:
            data = Path(prebuilt).read_bytes()
            if native.built_for(data, **inputs):
                return data, "native"
        if forwarder == "native" or native.compiler():
            try:
                return native.compile_forwarder(**inputs), "native"
            except native.BuildError as exc:
                raise InstallError(f"native forwarder: {exc}") from None
    code = native.inprocess_code(inputs["paths"])
    return ("#!/bin/sh\n"
            f"# route-tune CNI plugin shim, written by `cni-route-tune install`.\n"
            f"# route-tune-runtime-version: {version}\n"
            f"exec {shlex.quote(inputs['python'])} -I -S -c {shlex.quote(code)} \"$@\"\n"
            ).encode(), "script"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(src: Path, dst: Path) -> None:
    """os.replace, retried while the kernel says the target is busy (ETXTBSY)."""
    for attempt in range(_ETXTBSY_TRIES):
        try:
            os.replace(src, dst)
            return
        except OSError as exc:
            if exc.errno != errno.ETXTBSY or attempt == _ETXTBSY_TRIES - 1:
                raise
            time.sleep(0.1)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write to a temp name beside path, fsync, then rename over it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)   # umask-proof
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); False when unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _publish(tmp: Path, vdir: Path) -> None:
    """Move a finished tmp tree to its version name; swap atomically if a broken one is there."""
    if vdir.exists():
        if not _exchange(tmp, vdir):
            old = vdir.with_name(f"{vdir.name}.old-{os.getpid()}")
            os.rename(vdir, old)
            os.rename(tmp, vdir)
            tmp = old
        shutil.rmtree(tmp)
    else:
        os.rename(tmp, vdir)
    _fsync_dir(vdir.parent)


# --------------------------------------------------------------------------- checks

def _check_dir(path: Path, what: str, *, create: bool) -> None:
    if path.is_symlink():
        raise InstallError(f"{what} {path} is a symlink; refusing (pass the real directory)")
    if not path.exists():
        if not create:
            raise InstallError(f"{what} {path} does not exist")
        path.mkdir(mode=0o755, parents=True)
    elif not path.is_dir():
        raise InstallError(f"{what} {path} is not a directory")


def _check_host_dir(value: str) -> str:
    if not os.path.isabs(value) or any(c in value for c in "\n\r\0"):
        raise InstallError(f"host runtime dir must be an absolute path, got {value!r}")
    return os.path.normpath(value)


def _shim_version(shim: Path) -> str | None:
    """The runtime version a shim names (a script's comment, a compiled-in string)."""
    try:
        with open(shim, "rb") as f:
            found = _SHIM_VERSION_RE.search(f.read(_SHIM_SCAN))
    except OSError:
        return None
    return found.group(1).decode(errors="replace") if found else None


# --------------------------------------------------------------------------- the install

def install(cni_bin_dir: str | os.PathLike, runtime_dir: str | os.PathLike, *,
            source_runtime: str | os.PathLike | None = None, version: str | None = None,
            host_runtime_dir: str | None = None, defaults_file: str | os.PathLike | None = None,
            defaults_dest: str | os.PathLike = DEFAULT_DEFAULTS_DEST,
            overwrite_defaults: bool = False, keep: int = DEFAULT_KEEP,
            forwarder: str = "auto", dry_run: bool = False) -> InstallReport:
    """Install (or upgrade to) a runtime version and point the CNI bin dir's shim at it.

    ``runtime_dir`` is where this process writes; ``host_runtime_dir`` (default: the same) is
    the path the node sees, written into the shim. Idempotent: a rerun with the same source
    changes nothing and reports ``changed=False``. ``forwarder``: see :data:`FORWARDERS`.
    """
    bin_dir, rt_dir = Path(cni_bin_dir), Path(runtime_dir)
    host_rt = _check_host_dir(host_runtime_dir or os.path.abspath(rt_dir))
    if keep < 1:
        raise InstallError("keep must be at least 1")
    source = (source_from_tree(Path(source_runtime)) if source_runtime
              else source_from_interpreter())
    version = version or source.package_version
    if not _VERSION_RE.match(version) or ".tmp-" in version or ".old-" in version:
        raise InstallError(f"unusable version label {version!r}")
    vdir, shim = rt_dir / version, bin_dir / SHIM_NAME
    report = InstallReport(version, str(vdir), str(shim), dry_run=dry_run)
    _check_dir(bin_dir, "CNI bin dir", create=False)
    if shim.is_dir():
        raise InstallError(f"{shim} is a directory")
    defaults = _read_defaults(Path(defaults_file)) if defaults_file is not None else None
    digest = tree_digest(source.entries)
    text, kind = _shim_bytes(f"{host_rt}/{version}", version, source, forwarder)

    if dry_run:
        _plan_only(report, source, digest, vdir, shim, text, kind, host_rt, defaults_file,
                   Path(defaults_dest), overwrite_defaults)
        return report

    _check_dir(rt_dir, "runtime dir", create=True)
    lock = os.open(rt_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)   # serialise installs; released when lock closes
        _clean_stale(rt_dir, bin_dir, report)
        _install_runtime(source, digest, vdir, report)
        previous = _shim_version(shim)
        if not shim.exists() or shim.read_bytes() != text:
            _write_atomic(shim, text, 0o755)
            report.actions.append(f"shim {shim} ({kind}) -> {host_rt}/{version}"
                                  + (f" (was {previous})" if previous else ""))
        if defaults is not None:
            _install_defaults(defaults, Path(defaults_dest), overwrite_defaults, report)
        _prune(rt_dir, version, previous, keep, report)
    finally:
        os.close(lock)
    report.changed = bool(report.actions)
    return report


def _clean_stale(rt_dir: Path, bin_dir: Path, report: InstallReport) -> None:
    """Under the lock, any temp tree or temp shim belongs to an install that died."""
    for p in rt_dir.iterdir():
        if (".tmp-" in p.name or ".old-" in p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
            report.actions.append(f"removed stale {p}")
    for p in bin_dir.glob(f".{SHIM_NAME}.tmp-*"):
        p.unlink(missing_ok=True)
        report.actions.append(f"removed stale {p}")


def _install_runtime(source: Source, digest: str, vdir: Path, report: InstallReport) -> None:
    if is_complete(vdir, source, digest):
        return
    tmp = vdir.with_name(f"{vdir.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(mode=0o755)
        copy_tree(source, tmp)
        pkg_version = _self_test(tmp, source.site_rel)
        marker = {"version": vdir.name, "packageVersion": pkg_version, "digest": digest,
                  "files": len(source.entries), "site": source.site_rel,
                  "source": source.description}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        os.sync()   # the whole tree is durable before its name says it is complete
        _publish(tmp, vdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.actions.append(f"runtime {vdir} ({len(source.entries)} files from "
                          f"{source.description})")


def _read_defaults(src: Path) -> bytes:
    """The defaults file's bytes, checked to be a JSON object before anything is changed."""
    try:
        data = src.read_bytes()
        if not isinstance(json.loads(data), dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise InstallError(f"defaults file {src}: {exc}") from None
    return data


def _install_defaults(data: bytes, dest: Path, overwrite: bool, report: InstallReport) -> None:
    if dest.exists():
        if not overwrite or dest.read_bytes() == data:
            return
    _check_dir(dest.parent, "defaults dir", create=True)
    _write_atomic(dest, data, 0o644)
    report.actions.append(f"defaults {dest}")


def _prune(rt_dir: Path, version: str, previous: str | None, keep: int,
           report: InstallReport) -> None:
    """Keep the new version, the one the old shim named, then the most recent; drop the rest."""
    installed = [p for p in rt_dir.iterdir()
                 if p.is_dir() and not p.is_symlink() and (p / MARKER).is_file()]
    installed.sort(key=lambda p: (p / MARKER).stat().st_mtime, reverse=True)
    order = [version] + ([previous] if previous else []) + [p.name for p in installed]
    kept = list(dict.fromkeys(n for n in order if (rt_dir / n / MARKER).is_file()))[:keep]
    for p in installed:
        if p.name not in kept:
            shutil.rmtree(p)
            report.actions.append(f"pruned {p}")


def _plan_only(report: InstallReport, source: Source, digest: str, vdir: Path, shim: Path,
               text: bytes, kind: str, host_rt: str, defaults_file, defaults_dest: Path,
               overwrite: bool) -> None:
    acts = report.actions
    if not (vdir.is_dir() and is_complete(vdir, source, digest)):
        acts.append(f"would copy runtime ({len(source.entries)} files from "
                    f"{source.description}) to {vdir}")
    if not shim.exists() or shim.read_bytes() != text:
        acts.append(f"would write shim {shim} ({kind}) -> {host_rt}/{report.version}")
    if defaults_file is not None and (overwrite or not defaults_dest.exists()):
        acts.append(f"would install defaults {defaults_dest}")
    report.changed = bool(acts)


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cni-route-tune install",
        description="Install or upgrade route-tune on a node: copy a self-contained runtime to "
                    "<runtime-dir>/<version>/, then atomically flip the shim "
                    "<cni-bin-dir>/route-tune. Idempotent; safe while the old plugin runs.")
    p.add_argument("--cni-bin-dir", default=DEFAULT_CNI_BIN_DIR,
                   help="CNI bin dir as this process sees it (default %(default)s)")
    p.add_argument("--runtime-dir", default=DEFAULT_RUNTIME_DIR,
                   help="where runtime versions are written (default %(default)s)")
    p.add_argument("--host-runtime-dir", default=None,
                   help="the runtime dir as the node sees it, written into the shim "
                        "(default: --runtime-dir); e.g. /opt/route-tune when writing to "
                        "/host/opt/route-tune")
    p.add_argument("--source-runtime", default=None, metavar="DIR",
                   help="prepared runtime tree to copy (bin/python3, lib/python3.X/"
                        "site-packages); default: assemble one from this interpreter")
    p.add_argument("--runtime-version", default=None, metavar="LABEL",
                   help="version directory name (default: the source's cniplugin version)")
    p.add_argument("--defaults", default=None, metavar="FILE",
                   help="node defaults file to install when none is present")
    p.add_argument("--defaults-dest", default=DEFAULT_DEFAULTS_DEST, metavar="PATH",
                   help="where the node reads its defaults file (default %(default)s)")
    p.add_argument("--overwrite-defaults", action="store_true",
                   help="replace an existing defaults file (default: keep the node's file)")
    p.add_argument("--keep", type=int, default=DEFAULT_KEEP,
                   help="runtime versions to keep, the new one included (default %(default)s)")
    p.add_argument("--forwarder", choices=FORWARDERS, default="auto",
                   help="what <cni-bin-dir>/route-tune is: the static native forwarder (hands "
                        "requests to the resident engine without an interpreter start; built "
                        "here with cc), a #!/bin/sh script, or auto: native when a C compiler "
                        "is found (default %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `cni-route-tune install`: 0 done (or nothing to do), 1 refused/failed."""
    args = build_parser().parse_args(argv)
    try:
        report = install(args.cni_bin_dir, args.runtime_dir, source_runtime=args.source_runtime,
                         version=args.runtime_version, host_runtime_dir=args.host_runtime_dir,
                         defaults_file=args.defaults, defaults_dest=args.defaults_dest,
                         overwrite_defaults=args.overwrite_defaults, keep=args.keep,
                         forwarder=args.forwarder, dry_run=args.dry_run)
    except (InstallError, OSError) as exc:
        print(f"cni-route-tune install: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m cniplugin.cli.install` in images
    sys.exit(main())
