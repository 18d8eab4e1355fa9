"""Checkpoint save and resume on the GPU: a run stopped after 2 iterations and resumed to 4 ends with the
teacher and losses of a run that went to 4 at once.

The real command (``train3d.main``, tiny config, loader workers, pinned memory, CUDA random
generators saved with the checkpoint and reseeded every iteration). Within float tolerance, not
bit for bit as on the CPU (``tests/train/test_resume.py``): cuDNN may pick kernels whose
reductions run in another order from one process to the next.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"

pytestmark = pytest.mark.cuda

LOSSES = ("total_loss", "dino_loss", "ibot_loss", "koleo_loss")


def _argv(run_dir, datalist, cache_dir, iterations: int) -> list[str]:
    return ["--config-file", str(TINY_CONFIG), "--output-dir", str(run_dir), "--cache-dir", str(cache_dir),
            f"train.datalist={datalist}", "device=cuda", f"train.max_iterations={iterations}",
            "checkpointing.period_iterations=2", "evaluation.eval_period_iterations=4"]


def _losses(run_dir) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "training_metrics.json").read_text().splitlines()]
    return [{"iteration": line["iteration"], **{k: line[k] for k in LOSSES}} for line in lines]


def _model_state(run_dir, iteration: int) -> dict[str, torch.Tensor]:
    from dinov2.checkpoints.training_state import TrainingCheckpointer

    return TrainingCheckpointer.load(run_dir / "checkpoints" / f"model_{iteration:07d}.pth")["model"]


def _teacher(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "eval" / "training_4" / "teacher_checkpoint.pth", weights_only=True)["teacher"]


def test_resumed_gpu_run_ends_like_an_uninterrupted_one(tmp_path, synthetic_datalist):
    from dinov2.checkpoints.training_state import TrainingCheckpointer
    from dinov2.train import train3d

    cache = tmp_path / "cache"
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert train3d.main(_argv(reference, synthetic_datalist, cache, 4)) == 0
    assert train3d.main(_argv(resumed, synthetic_datalist, cache, 2)) == 0
    assert [it for it, _ in TrainingCheckpointer(resumed).list()] == [2]
    assert train3d.main(_argv(resumed, synthetic_datalist, cache, 4)) == 0
    assert "Resumed from" in (resumed / "log.txt").read_text()

    expected, got = _losses(reference), _losses(resumed)
    assert [line["iteration"] for line in got] == [0, 1, 2, 3]
    for e, g in zip(expected, got):
        for key in LOSSES:
            assert g[key] == pytest.approx(e[key], rel=1e-4, abs=1e-6), (g["iteration"], key)

    state = {run: _model_state(run, 4) for run in (reference, resumed)}
    at_2 = _model_state(resumed, 2)
    moved = max((state[reference][k] - at_2[k]).abs().max().item() for k in at_2 if k.startswith("student."))
    assert moved > 1e-4  # the last two iterations changed the student far more than the tolerance below
    assert state[resumed].keys() == state[reference].keys()
    for key, expected_tensor in state[reference].items():
        assert torch.allclose(state[resumed][key], expected_tensor, rtol=1e-4, atol=1e-6), key
    teacher, expected_teacher = _teacher(resumed), _teacher(reference)
    assert all(torch.allclose(teacher[k], expected_teacher[k], rtol=1e-4, atol=1e-6) for k in expected_teacher)
