"""README.md cites tests as `tests/<file>.py::<test>` (a following `::<test>` in the same cell means the same
file) and names test files as `tests/<file>.py`: each must exist, so that a moved or renamed test shows up
here instead of as a dead reference."""
from __future__ import annotations

import ast
import re

from tests.util import REPO

CITATION = re.compile(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`")


def citations(text: str) -> list[tuple[str, str | None]]:
    """(file, test or None) for every backquoted `tests/...` or `::test` in the README; a bare `::test`
    belongs to the file cited last on the same line."""
    found = []
    for line in text.splitlines():
        current = None
        for match in CITATION.finditer(line):
            file, test = match.groups()
            if file:
                current = file
            elif test is None:
                continue
            assert current, f"`::{test}` cites no file before it: {line[:200]}"
            found.append((current, test))
    return found


def functions(path) -> set[str]:
    return {node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}


def test_every_test_the_readme_cites_exists():
    cited = citations((REPO / "README.md").read_text())
    assert len({test for _, test in cited if test}) >= 50, "the README's test citations were not found"
    missing = []
    for file, test in cited:
        path = REPO / file
        if not path.is_file():
            missing.append(file)
        elif test and test not in functions(path):
            missing.append(f"{file}::{test}")
    assert not missing, f"README.md cites what does not exist: {missing}"


def test_the_citation_reader_follows_the_file_across_a_cell():
    line = "| x | `tests/test_a.py::test_one`, `::test_two`, `tests/test_b.py`, `::test_three` |"
    assert citations(line) == [("tests/test_a.py", "test_one"), ("tests/test_a.py", "test_two"),
                               ("tests/test_b.py", None), ("tests/test_b.py", "test_three")]
