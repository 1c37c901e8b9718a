"""Shared test helpers: where the official golden fixtures live (``../shared`` beside the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
