"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only shared/ folder (test vectors) that sits beside the checkout.

    Missing shared data is a broken setup, not a reason to skip: fail loudly.
    """
    path = Path(__file__).resolve().parents[2] / "shared"
    if not path.is_dir():
        pytest.fail(
            f"shared test data folder not found at {path}: check out shared/ beside the "
            "repository (see shared/vectors/README.md)",
            pytrace=False,
        )
    return path
