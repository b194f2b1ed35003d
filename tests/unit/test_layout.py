"""docs/design.md's module table is the import contract, and this test holds the code to it.

Each row of the table names a module (``engine/planner.py``), what it owns, and what it may import:
route-tune modules as dotted names under ``cniplugin`` (``engine.objects``; ``kernel.*`` for a whole
subpackage), third-party packages by name (``pydantic``), and after the word "lazily" the names it
may import only inside a function (the hot path stays cheap). The standard library is always allowed.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "cniplugin"
DESIGN = REPO / "docs" / "design.md"
THIRD_PARTY = {"pydantic", "pydantic_core", "netaddr", "pyroute2"}


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
        assert head in sys.stdlib_module_names or head in {"conftest"}, f"unknown import {name}"
        return None
    parts = name.split(".")[1:]
    while parts and ".".join(parts) not in modules:
        parts.pop()  # `from cniplugin.engine.objects import Rule` names engine.objects
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
