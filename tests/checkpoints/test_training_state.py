"""Training-state checkpoints (dinov2/checkpoints/training_state.py): retention, format check, naming."""

from __future__ import annotations

import pytest
import torch

from dinov2.checkpoints.training_state import TrainingCheckpointer, checkpoint_name
from dinov2.utils.rng import capture_rng_state


def test_checkpoint_retention_and_format_check(tmp_path):
    state = capture_rng_state()
    keeper = TrainingCheckpointer(tmp_path, max_to_keep=2)
    for it in (1, 2, 3):
        keeper.save({"iteration": it, "rng": [state]})
    assert [it for it, _ in keeper.list()] == [2, 3]
    assert keeper.latest().name == checkpoint_name(3) == "model_0000003.pth"
    assert TrainingCheckpointer.load(keeper.latest())["rng"][0]["numpy"][0] == "MT19937"
    export = tmp_path / "teacher.pth"
    torch.save({"teacher": {}, "iteration": 1}, export)
    with pytest.raises(ValueError, match="not a training-state checkpoint"):
        TrainingCheckpointer.load(export)
    with pytest.raises(ValueError, match="max_to_keep"):
        TrainingCheckpointer(tmp_path, max_to_keep=0)


def test_latest_removes_the_temporary_file_of_an_interrupted_save(tmp_path):
    keeper = TrainingCheckpointer(tmp_path)
    keeper.save({"iteration": 1})
    stray = keeper.directory / ".model_0000002.pth.abc.tmp"
    stray.write_bytes(b"half")
    assert keeper.latest().name == "model_0000001.pth" and not stray.exists()
