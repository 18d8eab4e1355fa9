"""Fixtures shared by every test folder."""

import pytest
import torch


@pytest.fixture()
def one_thread():
    """Run a test on one intra-op thread, restored afterwards.

    The tests' models and tensors are tiny: a second thread gains little, and on a loaded
    2-core machine OpenMP threads waiting for each other made the same tests about 10x slower.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
