"""Shared settings of the finetuning tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Run these small models on one intra-op thread, restored afterwards.

    Their tensors are tiny, so a second thread gains little; on a loaded 2-core machine
    (CI shares it) OpenMP threads waiting for each other made the same tests about 10x slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
