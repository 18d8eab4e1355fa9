"""RNG state capture and restore (dinov2/utils/rng.py), including the older segmentation format."""

from __future__ import annotations

import io
import random

import numpy as np
import torch

from dinov2.utils.rng import capture_rng_state, restore_rng_state


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_rng_state_round_trip_survives_safe_loading():
    state = capture_rng_state()
    expected = _draws()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restore_rng_state(torch.load(buffer, weights_only=True))  # only plain values and tensors
    assert _draws() == expected
    assert state["numpy"][0] == "MT19937"


def test_states_written_by_older_segmentation_runs_are_restored():
    # last_checkpoint.pth of segmentation finetuning held the generators' own tuples, no CUDA entry.
    legacy = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    expected = _draws()
    restore_rng_state(legacy)
    assert _draws() == expected
