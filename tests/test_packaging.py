"""pyproject.toml declares what the package imports, and nothing else."""

from __future__ import annotations

import ast
import re
import tomllib

from tests.conftest import REPO

# distribution name -> the module it provides, where the two differ
MODULE_OF = {"ml_dtypes": "ml_dtypes", "orbax-checkpoint": "orbax", "PyYAML": "yaml", "tensorboardX": "tensorboardX",
             "pillow": "PIL"}


def _imported_top_level_modules(*packages: str) -> set[str]:
    names = set()
    for package in packages:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


def test_every_dependency_is_imported_by_the_package():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    imported = _imported_top_level_modules("spb2_jax", "pallas_kernels")
    for dep in deps:
        name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0)
        module = MODULE_OF.get(name, name.replace("-", "_"))
        assert module in imported, f"{name} is a dependency but nothing in the package imports {module}"
        assert ">=" in dep, f"{dep}: give the lower bound the suite was run with"
