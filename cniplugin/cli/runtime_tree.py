"""The runtime ``cni-route-tune install`` copies: where its files come from (this interpreter, or
a prepared runtime tree such as the image's), the tree's digest and marker, and the copy itself.

``cli.install`` decides where the copy goes, which forwarder fronts it and how the node's
``route-tune`` is flipped; this module knows only the tree.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

__all__ = ["MARKER", "InstallError", "Entry", "Source", "walk_files", "source_from_interpreter",
           "source_from_tree", "tree_digest", "read_marker", "is_complete", "copy_tree"]

#: The marker file in a complete runtime version directory (the digest of its tree).
MARKER = ".route-tune-runtime.json"
# Parts of the base interpreter's stdlib a CNI plugin never needs (the static libpython alone is
# bigger than the rest of the runtime).
_STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "pydoc_data",
                "distutils", "site-packages", "dist-packages"}
_STDLIB_SKIP_PREFIX = ("config-",)


class InstallError(Exception):
    """The install was refused or failed; the node is left as it was before."""


class Entry(NamedTuple):
    rel: str              # path inside the runtime tree
    src: str              # absolute source path
    link: str | None      # symlink target (relative) or None for a regular file


@dataclass
class Source:
    entries: list[Entry]
    site_rel: str          # site-packages holding cniplugin, relative to the runtime root
    package_version: str   # cniplugin.__version__ found in the source
    description: str
    compile_dirs: list[str] = field(default_factory=list)  # rel dirs to byte-compile after copy


# --------------------------------------------------------------------------- sources

def walk_files(root: Path, rel_prefix: str, *, skip_top: Iterable[str] = (),
                skip_prefix: tuple[str, ...] = ()) -> list[Entry]:
    """Regular files and symlinks under root (symlinks are kept as links, never followed)."""
    skip = set(skip_top)
    out: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(skip_prefix)]
        for name in list(dirnames) + filenames:
            path = Path(dirpath, name)
            rel = f"{rel_prefix}/{path.relative_to(root).as_posix()}".lstrip("/")
            if path.is_symlink():
                out.append(Entry(rel, str(path), os.readlink(path)))
                if name in dirnames:
                    dirnames.remove(name)   # never descend through a link
            elif name in filenames and path.is_file():
                out.append(Entry(rel, str(path), None))
    return out


def source_from_interpreter() -> Source:
    """Assemble a runtime from the running interpreter: base binary + stdlib + our dependencies.

    Works from a venv (also an editable install, whose package is copied from its checkout).
    Used by tests and same-distro nodes; the DaemonSet image passes --source-runtime instead.
    """
    import importlib.metadata as metadata
    import sysconfig

    import cniplugin
    from cniplugin._version import __version__

    pyver = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    base_exe = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    stdlib = Path(sysconfig.get_path("stdlib", vars={"installed_base": sys.base_prefix,
                                                     "base": sys.base_prefix}))
    purelib = Path(sysconfig.get_path("purelib"))
    site_rel = f"lib/{pyver}/site-packages"

    entries = [Entry("bin/python3", str(base_exe), None)]
    # Distro symlinks out of the stdlib (Debian: sitecustomize.py -> /etc/...) would dangle on
    # the node; the shim runs with -S, which never reads them, so they are left out.
    entries += [e for e in walk_files(stdlib, f"lib/{pyver}", skip_top=_STDLIB_SKIP,
                                       skip_prefix=_STDLIB_SKIP_PREFIX)
                if e.link is None or not escapes(e)]
    # A --enable-shared interpreter finds libpython via RPATH $ORIGIN/../lib: bring it along.
    for lib in sorted(Path(sys.base_prefix, "lib").glob("libpython3*.so*")):
        entries.append(Entry(f"lib/{lib.name}", os.path.realpath(lib), None))

    # Dependencies: the closure of route-tune's requirements, minus extras, copied file by
    # file from each distribution's RECORD so that test tools in the venv stay behind.
    dists = {norm(d.metadata["Name"]): d for d in metadata.distributions(path=[str(purelib)])}
    todo, seen = ["route-tune"], set()
    while todo:
        name = norm(todo.pop())
        if name in seen or name not in dists:
            continue
        seen.add(name)
        for req in dists[name].requires or ():
            if "extra" not in req.partition(";")[2]:
                todo.append(re.match(r"[A-Za-z0-9._-]+", req).group(0))
    seen.discard("route-tune")
    for name in sorted(seen):
        for f in dists[name].files or ():
            src = Path(dists[name].locate_file(f)).resolve()
            if src.is_relative_to(purelib) and src.is_file():
                entries.append(Entry(f"{site_rel}/{src.relative_to(purelib).as_posix()}",
                                      str(src), None))

    pkg = Path(cniplugin.__file__).resolve().parent
    entries += [e for e in walk_files(pkg, f"{site_rel}/cniplugin")
                if "__pycache__" not in e.rel and e.link is None]
    return Source(entries, site_rel, __version__, f"interpreter {base_exe}",
                   compile_dirs=[f"{site_rel}/cniplugin"])


def source_from_tree(root: Path) -> Source:
    """A prepared runtime tree (the image's): bin/python3 + lib/python3.X/site-packages/cniplugin."""
    if not root.is_dir():
        raise InstallError(f"source runtime {root} is not a directory")
    root = root.resolve()
    hits = sorted(root.glob("lib/python3*/site-packages/cniplugin/_version.py"))
    if len(hits) != 1:
        raise InstallError(f"source runtime {root}: expected one lib/python3.X/site-packages/"
                           f"cniplugin, found {len(hits)}")
    if not os.access(root / "bin/python3", os.X_OK):
        raise InstallError(f"source runtime {root}: bin/python3 is missing or not executable")
    # The marker describes a copy; a tree that was itself installed carries one: skip it.
    entries = [e for e in walk_files(root, "") if e.rel != MARKER]
    for e in entries:
        if e.link is not None and escapes(e):
            raise InstallError(f"source runtime {root}: symlink {e.rel} -> {e.link} leaves "
                                   "the tree (it would dangle on the node)")
    site_rel = hits[0].parent.parent.relative_to(root).as_posix()
    found = re.search(r'__version__\s*=\s*["\']([^"\']+)', hits[0].read_text())
    return Source(entries, site_rel, found.group(1) if found else "unknown", f"tree {root}")


def escapes(entry: Entry) -> bool:
    """A symlink that is absolute or climbs out of the runtime tree."""
    target = os.path.normpath(os.path.join(os.path.dirname(entry.rel), entry.link))
    return os.path.isabs(entry.link) or target == ".." or target.startswith("../")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------- tree helpers

def tree_digest(entries: Sequence[Entry], root: Path | None = None) -> str:
    """Content digest of the entries, read from their source or (root given) from the copy."""
    h = hashlib.sha256()
    for e in sorted(entries):
        path = root / e.rel if root is not None else Path(e.src)
        h.update(e.rel.encode() + b"\0")
        if e.link is not None:
            h.update(b"L" + os.readlink(path).encode())
        else:
            h.update(b"X" if os.access(path, os.X_OK) else b"F")
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def read_marker(vdir: Path) -> dict | None:
    try:
        return json.loads((vdir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_complete(vdir: Path, source: Source, digest: str) -> bool:
    """The version dir holds exactly this source's content (marker and files agree)."""
    marker = read_marker(vdir)
    if not marker or marker.get("digest") != digest:
        return False
    try:
        return tree_digest(source.entries, vdir) == digest
    except OSError:
        return False


def copy_tree(source: Source, dest: Path) -> None:
    made: set[Path] = set()
    for e in source.entries:
        target = dest / e.rel
        if target.parent not in made:
            target.parent.mkdir(parents=True, exist_ok=True)
            made.add(target.parent)
        if e.link is not None:
            os.symlink(e.link, target)
        else:
            shutil.copy2(e.src, target)   # keeps mode and mtime, so shipped .pyc stay valid
    if source.compile_dirs:
        import compileall
        for rel in source.compile_dirs:   # precompiled .pyc: the node never compiles at run time
            compileall.compile_dir(str(dest / rel), quiet=1)
