"""The test suite's own rules: shared cases and helpers live in ``tests/helpers.py`` (fixtures in
``tests/conftest.py``), so no test module imports another one."""

from __future__ import annotations

import ast

from tests.helpers import REPO


def _imported_test_modules(source: str, stems: set[str]) -> list[str]:
    """Names of the test modules (``tests/<stem>.py`` for a stem in ``stems``) that ``source`` imports, in any
    form: ``import tests.test_x``, ``from tests.test_x import y``, ``from tests import test_x``, relative."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = f"tests.{module}" if module else "tests"
            names += [module] + [f"{module}.{a.name}" for a in node.names]

    found = set()
    for name in names:
        parts = name.split(".")
        stem = parts[1] if parts[0] == "tests" and len(parts) > 1 else parts[0]
        if stem in stems:
            found.add(stem)
    return sorted(found)


def test_no_test_module_imports_another():
    tests = sorted((REPO / "tests").glob("test_*.py"))
    stems = {p.stem for p in tests}
    assert "test_suite_hygiene" in stems
    for source in ("from tests import test_x as t", "from tests.test_x import f", "import tests.test_x",
                   "from .test_x import f"):  # the scan sees every form
        assert _imported_test_modules(source, {"test_x"}), source
    assert not _imported_test_modules("from tests import helpers, oracles\nfrom tests.helpers import f", stems)
    offenders = {p.name: bad for p in tests if (bad := _imported_test_modules(p.read_text(), stems))}
    assert not offenders, f"move what test modules share to tests/helpers.py: {offenders}"
