"""Shared fixtures: a complete local setup on a temporary folder, and the vectors folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from cardseal.testing import LocalSetup

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WYCHEPROOF = SHARED / "vectors" / "wycheproof"


@pytest.fixture
def setup(tmp_path: Path) -> LocalSetup:
    return LocalSetup.create(tmp_path)


@pytest.fixture(scope="session")
def wycheproof_dir() -> Path:
    if not WYCHEPROOF.is_dir():
        raise RuntimeError(f"Wycheproof vectors not found at {WYCHEPROOF} (../shared)")
    return WYCHEPROOF
