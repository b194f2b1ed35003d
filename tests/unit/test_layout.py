"""docs/design.md's module table is the import contract, and this test holds the code to it.

Each row of the table names a module (``engine/planner.py``), what it owns, and what it may import:
route-tune modules as dotted names under ``cniplugin`` (``records.objects``; ``kernel.*`` for a whole
subpackage), third-party packages by name (``pydantic``), and after the word "lazily" the names it
may import only inside a function (the hot path stays cheap). The standard library is always allowed.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from harness.host import REPO

PACKAGE = REPO / "cniplugin"
DESIGN = REPO / "docs" / "design.md"
THIRD_PARTY = {"pydantic", "pydantic_core", "netaddr", "pyroute2", "prometheus_client"}


def _modules() -> dict[str, Path]:
    """Every module of the package as a dotted name under ``cniplugin`` (``engine.planner``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        if rel.name == "__init__":
            if path.read_text().strip() and rel.parent != Path("."):
                found[".".join(rel.parent.parts) + ".__init__"] = path
            continue
        found[".".join(rel.parts)] = path
    return found


def _contract() -> dict[str, tuple[set[str], set[str]]]:
    """module -> (names it may import anywhere, names it may import only lazily)."""
    rows = {}
    for line in DESIGN.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not re.fullmatch(r"`[\w/]+\.py`", cells[0]):
            continue
        module = cells[0].strip("`")[:-3].replace("/", ".")
        eager_text, _, lazy_text = cells[2].partition("lazily")
        rows[module] = (set(re.findall(r"`([\w.*]+)`", eager_text)),
                        set(re.findall(r"`([\w.*]+)`", lazy_text)))
    return rows


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported name, at module level?) for every import of route-tune or third-party code."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    typing_only = set()  # `if TYPE_CHECKING:` imports never run
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            typing_only |= {id(n) for n in ast.walk(node)}
        elif isinstance(node, (ast.If, ast.Try)):  # these run at import time
            top |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the module's own package
                package = path.relative_to(PACKAGE).parent.parts[:len(path.relative_to(
                    PACKAGE).parent.parts) - node.level + 1]
                base = ".".join(("cniplugin", *package, *([base] if base else [])))
            names = [f"{base}.{a.name}" if base == "cniplugin" or base.count(".") == 1
                     and base.startswith("cniplugin.") else base for a in node.names]
        for name in names:
            out.append((name, id(node) in top))
    return out


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The route-tune module or third-party package an import names (None: stdlib)."""
    head = name.split(".")[0]
    if head in THIRD_PARTY:
        return head
    if head != "cniplugin":
        assert head in sys.stdlib_module_names, f"unknown import {name}"
        return None
    parts = name.split(".")[1:]
    while parts and ".".join(parts) not in modules:
        parts.pop()  # `from cniplugin.records.objects import Rule` names records.objects
    return ".".join(parts) or "__init__"


def _allowed(target: str, names: set[str], module: str) -> bool:
    if target == module:
        return True
    return any(target == n or (n.endswith(".*") and target.startswith(n[:-1])) for n in names)


def test_every_module_has_one_row_and_every_row_a_module():
    modules, rows = _modules(), _contract()
    assert sorted(set(modules) - {"__init__"} - set(rows)) == [], "modules missing in design.md"
    assert sorted(set(rows) - set(modules)) == [], "design.md rows for modules that do not exist"


def test_imports_follow_the_table():
    modules, rows = _modules(), _contract()
    broken = []
    for module, path in modules.items():
        eager, lazy = rows.get(module, (set(), set()))
        for name, at_top in _imports(path):
            target = _target(name, modules)
            if target is None or target == "__init__" and module.startswith("lab"):
                continue
            if _allowed(target, eager, module) or (not at_top and _allowed(target, lazy, module)):
                continue
            broken.append(f"{module} imports {target}" + ("" if at_top else " (lazily)"))
    broken = sorted(set(broken))
    assert broken == [], "imports docs/design.md does not allow:\n" + "\n".join(broken)


def _layers() -> dict[str, int]:
    """design.md's layer list: top-level name (``records``, ``_version``) -> its rank, lowest 0."""
    text = DESIGN.read_text()
    block = text[text.index("<!-- layers -->"):text.index("<!-- /layers -->")]
    ranks = {}
    for rank, line in enumerate(re.findall(r"^\d+\. (.+)$", block, re.M)):
        for name in re.findall(r"`(\w+)/?`", line):
            ranks[name] = rank
    return ranks


def test_every_import_points_down_the_layers():
    """Eager or lazy, an import stays in its own subpackage or goes to a lower layer."""
    modules, ranks = _modules(), _layers()
    assert sorted({m.split(".")[0] for m in modules} - set(ranks)) == [], "modules with no layer"
    upward = []
    for module, path in modules.items():
        here = module.split(".")[0]
        for name, _ in _imports(path):
            target = _target(name, modules)
            if target is None or target in THIRD_PARTY:
                continue
            there = target.split(".")[0]
            if there != here and ranks[there] >= ranks[here]:
                upward.append(f"{module} imports {target}")
    assert sorted(set(upward)) == [], "imports that do not point down:\n" + "\n".join(upward)


_PUBLIC = {"_asdict", "_replace", "_make"}  # namedtuple's public methods


def test_no_private_name_is_called_from_outside_its_module():
    """A call ``x._name(...)`` or an import of ``_name`` reaches only into the module's own
    definitions: another module's private functions and methods stay private. (Standard-library
    internals such as ``os._exit``, and a namedtuple's ``_asdict``/``_replace``, are not
    route-tune's to keep private.)"""
    leaks = []
    for module, path in _modules().items():
        tree = ast.parse(path.read_text())
        own = {n.name for n in ast.walk(tree)
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        own |= {t.attr for n in ast.walk(tree) if isinstance(n, ast.Assign)
                for t in n.targets if isinstance(t, ast.Attribute)}
        stdlib = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                  for a in n.names if a.name.split(".")[0] in sys.stdlib_module_names}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cniplugin"):
                leaks += [f"{module}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name, base = node.func.attr, node.func.value
            if not name.startswith("_") or name.startswith("__") or name in own | _PUBLIC:
                continue
            if isinstance(base, ast.Name) and (base.id in ("self", "cls") or base.id in stdlib):
                continue
            leaks.append(f"{module}: {ast.unparse(node.func)}()")
    assert sorted(set(leaks)) == [], "private names used across modules:\n" + "\n".join(leaks)


def test_module_level_imports_have_no_cycles():
    modules = _modules()
    graph = {m: {t for name, top in _imports(p) if top
                 and (t := _target(name, modules)) in modules and t != m}
             for m, p in modules.items()}
    cycles, done = [], set()

    def visit(node, trail):
        if node in trail:
            cycles.append(" -> ".join(trail[trail.index(node):] + [node]))
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, trail + [node])
        done.add(node)

    for start in sorted(graph):
        visit(start, [])
    assert cycles == []


def test_only_the_netlink_adapter_imports_pyroute2():
    modules = _modules()
    users = sorted(m for m, p in modules.items() if any(n.split(".")[0] == "pyroute2"
                                                        for n, _ in _imports(p)))
    assert users == ["kernel.netlink"]


def test_tests_reach_the_harness_only_through_its_imports():
    """No test or harness module imports ``conftest`` or another test module, or edits
    ``sys.path``: what tests share lives in ``tests/harness``."""
    broken = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            broken += [f"{path.relative_to(REPO)} imports {n}" for n in names
                       if n.split(".")[0] == "conftest" or n.split(".")[0].startswith("test_")]
            if isinstance(node, ast.Attribute) and node.attr == "path" and \
                    isinstance(node.value, ast.Name) and node.value.id == "sys":
                broken.append(f"{path.relative_to(REPO)} uses sys.path")
    assert broken == []
