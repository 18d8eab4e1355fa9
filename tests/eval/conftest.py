"""Shared settings of the segmentation finetuning tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread(request):
    """Run the segmentation tests' small models on one intra-op thread, restored afterwards.

    Their tensors are tiny, so a second thread gains little; on a loaded 2-core machine (CI
    shares it) OpenMP threads waiting for each other made the same tests about 10x slower.
    Other test modules in this folder keep the default thread count.
    """
    if not Path(str(request.node.fspath)).name.startswith("test_segmentation"):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
