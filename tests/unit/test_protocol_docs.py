"""docs/protocol.md's error-code table is the ``protocol.errors`` docstring tree, and the README's
first two commands are the demo and the test command CI runs; CI keeps them equal."""

from __future__ import annotations

import re

from cniplugin.protocol import errors as _errors
from harness.host import REPO


def _docstring_rows() -> list[tuple[int, str, str]]:
    rows = []
    for line in _errors.__doc__.splitlines():
        match = re.match(r"\s*[│├└─ ]*\s*(\w+)\s+(\d+)\s+(.*)$", line)
        if match and match.group(1) != "CNIError":
            name, code, when = match.groups()
            rows.append((int(code), name, when.strip()))
    return rows


def test_error_table_matches_the_exception_tree():
    rows = _docstring_rows()
    assert {name: code for code, name, _ in rows} == \
        {name: getattr(_errors, name).code for _, name, _ in rows}
    doc = (REPO / "docs" / "protocol.md").read_text().splitlines()
    from_doc = [line for line in doc if re.match(r"\| \d+ \| `\w+` \|", line)]
    assert from_doc == [f"| {code} | `{name}` | {when} |" for code, name, when in rows]


def test_error_codes_table_is_the_first_class_of_each_code():
    first: dict[int, str] = {}
    for code, name, _ in _docstring_rows():
        first.setdefault(code, name)
    assert first == {code: cls.__name__ for code, cls in _errors.ERROR_CODES.items()}


def test_ci_runs_exactly_the_readme_test_command():
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith("#")]
    assert ci[-1] == "exec bin/dev test"
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```sh\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#", 1)[0].strip() for line in first_block.splitlines()]
    assert commands == ["bin/dev demo", "bin/dev test"]
