"""The README's error-code table is the ``protocol.errors`` docstring tree; CI keeps them equal."""

from __future__ import annotations

import re

from cniplugin.protocol import errors as _errors
from harness.host import REPO


def test_readme_error_table_matches_the_exception_tree():
    from_docstring = []
    for line in _errors.__doc__.splitlines():
        match = re.match(r"\s*[│├└─ ]*\s*(\w+)\s+(\d+)\s+(.*)$", line)
        if match and match.group(1) != "CNIError":
            name, code, when = match.groups()
            assert getattr(_errors, name).code == int(code), name
            from_docstring.append(f"| {code} | `{name}` | {when.strip()} |")
    readme = (REPO / "README.md").read_text().splitlines()
    from_readme = [line for line in readme if re.match(r"\| \d+ \| `\w+` \|", line)]
    assert from_readme == from_docstring
    assert {int(c) for c in re.findall(r"^\| (\d+) \|", "\n".join(from_readme), re.M)} == \
        set(_errors.ERROR_CODES)


def test_ci_runs_exactly_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "exec bin/dev test\n" in ci
    assert "bin/dev test" in (REPO / "README.md").read_text()
