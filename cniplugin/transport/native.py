"""Build the native forwarder (``transport/forwarder.c``): the fast ``route-tune`` executable.

The forwarder hands each CNI request to the resident engine without starting an interpreter and
execs the in-process plugin, :func:`inprocess_argv`, for everything else (docs/resident.md). The
interpreter, the ``-c`` program and the version label are compiled in, so a build belongs to one
runtime: ``bin/dev setup`` builds the venv's ``route-tune``, ``cni-route-tune install`` builds the
node's into its CNI bin dir. Linked statically: a node's own libc is not ours to rely on.

  python -m cniplugin.transport.native --output PATH [--python PY] [--path DIR ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from cniplugin._version import PLUGIN_NAME, __version__

__all__ = ["SOURCE", "BuildError", "build", "built_for", "compile_forwarder", "compiler", "default_paths", "inprocess_argv",
           "inprocess_code", "is_native"]

SOURCE = Path(__file__).with_name("forwarder.c")
ENTRY_MODULE = "cniplugin.transport.plugin"
CFLAGS = ("-O2", "-static", "-s", "-Wall", "-Wextra", "-Werror")


class BuildError(Exception):
    """No C compiler, or the forwarder did not compile."""


def default_paths() -> list[str]:
    """Where this interpreter finds cniplugin and its dependencies (sys.path entries that
    ``-S`` leaves out: the site-packages dirs and the checkout of an editable install)."""
    package_parent = str(Path(__file__).resolve().parents[2])
    paths = [package_parent, sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    return list(dict.fromkeys(p for p in paths if os.path.isdir(p)))


def inprocess_code(paths: list[str]) -> str:
    """The ``-c`` program of the in-process plugin: no ``site`` (``-S``), our paths appended
    after the standard library so nothing there can shadow it."""
    return (f"import sys;sys.argv[0]={PLUGIN_NAME!r};sys.path.extend({paths!r});"
            f"from {ENTRY_MODULE} import main;sys.exit(main())")


def inprocess_argv(python: str | None = None, paths: list[str] | None = None) -> list[str]:
    """What the forwarder execs to run a request in-process (the plugin's own arguments follow)."""
    return [python or sys.executable, "-I", "-S", "-c",
            inprocess_code(default_paths() if paths is None else paths)]


def compiler() -> str | None:
    """``$CC`` or ``cc`` on PATH."""
    return shutil.which(os.environ.get("CC") or "cc")


def is_native(path: str | os.PathLike) -> bool:
    """An ELF executable (the forwarder), not a script."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _c_string(text: str) -> str:
    out = ['"']
    for byte in text.encode():
        ch = chr(byte)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= byte < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return "".join(out) + '"'


def compile_forwarder(*, python: str | None = None, paths: list[str] | None = None,
                      version: str | None = None, cc: str | None = None) -> bytes:
    """The forwarder executable's bytes (the same inputs give the same bytes).

    ``python`` and ``paths`` are the in-process plugin's interpreter and import paths *as the
    node sees them* (default: this interpreter's); ``version`` is the runtime label that
    ``cni-route-tune install`` reads back from the binary.
    """
    cc = cc or compiler()
    if not cc:
        raise BuildError("no C compiler: install gcc and libc6-dev (apt-get install gcc "
                         "libc6-dev), or set CC")
    argv = inprocess_argv(python, paths)
    defines = (f"#define RT_PYTHON {_c_string(argv[0])}\n"
               f"#define RT_CODE {_c_string(argv[4])}\n"
               f"#define RT_VERSION {_c_string(version or __version__)}\n")
    with tempfile.TemporaryDirectory(prefix="route-tune-build-") as tmp:
        header = Path(tmp) / "runtime.h"
        header.write_text(defines)
        out = Path(tmp) / PLUGIN_NAME
        proc = subprocess.run([cc, *CFLAGS, "-include", str(header), "-o", str(out), str(SOURCE)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"compiling {SOURCE.name} failed: {proc.stderr.strip()[-2000:]}\n"
                             "a static build needs libc6-dev (apt-get install gcc libc6-dev)")
        return out.read_bytes()


def built_for(data: bytes, *, python: str, paths: list[str], version: str) -> bool:
    """Whether forwarder bytes carry exactly these compiled-in inputs (a prebuilt forwarder is
    used only for the node path and version it was built for)."""
    return (data[:4] == b"\x7fELF" and python.encode() + b"\0" in data
            and inprocess_code(paths).encode() + b"\0" in data
            and f"\n# route-tune-runtime-version: {version}\n".encode() in data)


def build(dest: str | os.PathLike, **inputs) -> Path:
    """Compile the forwarder (:func:`compile_forwarder`'s inputs) to ``dest``: mode 0755,
    renamed into place, so a running runtime never executes a half-written file."""
    data = compile_forwarder(**inputs)
    dest = Path(dest)
    staged = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    staged.write_bytes(data)
    os.chmod(staged, 0o755)
    os.replace(staged, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cniplugin.transport.native",
                                     description="Build route-tune's native forwarder.")
    parser.add_argument("--output", required=True, help="where to write the executable")
    parser.add_argument("--python", default=None,
                        help="interpreter of the in-process plugin (default: this one)")
    parser.add_argument("--path", action="append", default=None,
                        help="import path of cniplugin and its dependencies (repeatable; "
                             "default: this interpreter's)")
    parser.add_argument("--runtime-version", default=None,
                        help="the runtime label compiled in (default: cniplugin's version)")
    args = parser.parse_args(argv)
    try:
        build(args.output, python=args.python, paths=args.path, version=args.runtime_version)
    except BuildError as exc:
        print(f"route-tune: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
