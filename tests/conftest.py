"""Shared test helpers: where the official golden fixtures live (``../shared`` beside the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite compiles hundreds of small XLA programs on a 2-core CI machine, where compile time dominates. LLVM -O0
# for XLA:CPU's generated code compiles them ~30% faster (measured on the generation tests) and leaves the HLO, and
# so the computation, unchanged. Only the test process and its subprocesses are affected, never the package.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPB2_SHARED", REPO.parent / "shared"))
OFFICIAL = SHARED / "fixtures" / "official"
FIXTURES = ("tiny", "tiny-mask", "tiny-gla", "tiny-gla-mask", "tiny-var", "tiny-leftpad")


def fixture_dir(name: str) -> Path:
    """Directory of an official fixture; fails loudly (never skips) when ../shared is absent."""
    path = OFFICIAL / name
    if not (path / "outputs.npz").is_file():
        raise FileNotFoundError(f"official fixture {name!r} not found at {path}: the tests need ../shared beside "
                                "the repository (or SPB2_SHARED pointing at it)")
    return path


@pytest.fixture(params=FIXTURES)
def official_fixture(request) -> Path:
    return fixture_dir(request.param)
