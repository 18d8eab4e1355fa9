"""Hand-built label volumes shared by the instance segmentation tests."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture()
def touching_cubes() -> np.ndarray:
    """``(12, 7, 7)`` int32: two 5^3 cubes (ids 1 and 2) sharing the face between x = 5 and 6."""
    labels = np.zeros((12, 7, 7), dtype=np.int32)
    labels[1:6, 1:6, 1:6] = 1
    labels[6:11, 1:6, 1:6] = 2
    return labels
