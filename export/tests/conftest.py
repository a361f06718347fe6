"""Shared fixtures: the tiny model regenerated from its fixed seed (never read from the bundle)."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.__main__ import load_tiny
from export.models import EliteModels


@pytest.fixture(scope="session")
def tiny_upstream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-upstream")


@pytest.fixture(scope="session")
def tiny(tiny_upstream: Path) -> EliteModels:
    return load_tiny(tiny_upstream)
