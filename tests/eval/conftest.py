"""Shared settings of the segmentation finetuning tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def single_thread(request):
    """The segmentation tests run on one thread (see ``one_thread`` in tests/conftest.py)."""
    if Path(str(request.node.fspath)).name.startswith("test_segmentation"):
        request.getfixturevalue("one_thread")
    yield
