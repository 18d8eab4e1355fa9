"""A finetuning run killed after a checkpoint continues from it instead of starting over."""

from __future__ import annotations

import json

import pytest
import torch

from dinov2.checkpoints.teacher_export import save_teacher_checkpoint
from dinov2.eval.segmentation import finetune
from dinov2.eval.segmentation import train_loop
from dinov2.models import build_model
from dinov2.sample_data import write_segmentation_dataset

RUN = [
    "--pretrained-weights", "none", "--dataset-name", "brain_tissue", "--segmentation-head", "Linear",
    "--epochs", "1", "--epoch-length", "6", "--eval-iters", "3", "--warmup-iters", "1", "--batch-size", "1",
    "--num-workers", "0", "--image-size", "32", "--resize-scale", "0.5", "train.log_period_iterations=1",
    "model.arch=vit_tiny_3d", "model.backbone_kwargs={embed_dim: 32, depth: 4, num_heads: 2, patch_size: 8}",
    "evaluation.overlap=0",
]


class Killed(Exception):
    pass


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, caplog):
    data = tmp_path / "data"
    write_segmentation_dataset(data, labels="tissue", seed=0)
    out = tmp_path / "run"
    args = RUN + ["--base-data-dir", str(data), "--output-dir", str(out)]

    original_save = train_loop.atomic_torch_save

    def save_then_die(obj, path):
        original_save(obj, path)
        raise Killed  # the process dies right after the checkpoint of iteration 3

    monkeypatch.setattr(train_loop, "atomic_torch_save", save_then_die)
    with pytest.raises(Killed):
        finetune.main(args)
    assert not (out / "results.json").exists()

    monkeypatch.setattr(train_loop, "atomic_torch_save", original_save)
    caplog.set_level("INFO", logger="dinov2.eval.segmentation.train_loop")
    assert finetune.main(args) == 0
    assert "Resumed from" in caplog.text and "at iteration 3" in caplog.text

    results = json.loads((out / "results.json").read_text())
    trained = [point["iteration"] for point in results["curves"]["train"]]
    validated = [point["iteration"] for point in results["curves"]["validation"]]
    assert trained == [1, 2, 3, 4, 5, 6]  # iterations 1-3 from the first process, 4-6 after resuming
    assert validated == [3, 6]


def _teacher(path, seed):
    torch.manual_seed(seed)
    model = build_model("vit_tiny_3d", embed_dim=32, depth=4, num_heads=2, patch_size=8, img_size=32)
    config = {"student": {"arch": "vit_tiny_3d", "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2},
              "crops": {"global_crops_size": 32}}
    return save_teacher_checkpoint(path, {f"backbone.{k}": v for k, v in model.state_dict().items()}, config, 0)


def test_frozen_backbone_is_not_copied_into_the_resumable_state(tmp_path, monkeypatch, error_line):
    data = tmp_path / "data"
    write_segmentation_dataset(data, labels="tissue", seed=0)
    weights = _teacher(tmp_path / "teacher.pth", 0)
    out = tmp_path / "run"
    run = [a for a in RUN if not a.startswith("model.")]
    run[run.index("none")] = str(weights)
    args = run + ["--base-data-dir", str(data), "--output-dir", str(out)]

    original_save = train_loop.atomic_torch_save

    def save_then_die(obj, path):
        original_save(obj, path)
        raise Killed

    monkeypatch.setattr(train_loop, "atomic_torch_save", save_then_die)
    with pytest.raises(Killed):
        finetune.main(args)
    last = torch.load(out / train_loop.LAST_NAME, map_location="cpu", weights_only=False)
    best = torch.load(out / train_loop.BEST_NAME, map_location="cpu", weights_only=False)
    backbone_keys = [k for k in best["model"] if k.startswith("backbone.")]
    assert backbone_keys and not any(k.startswith("backbone.") for k in last["model"])
    assert set(last["model"]) == set(best["model"]) - set(backbone_keys)  # the head, all of it

    monkeypatch.setattr(train_loop, "atomic_torch_save", original_save)
    other = _teacher(tmp_path / "other.pth", 1)
    assert finetune.main([str(other) if a == str(weights) else a for a in args]) == 1
    assert "same --pretrained-weights" in error_line()
    assert finetune.main(args) == 0
    assert json.loads((out / "results.json").read_text())["curves"]["validation"][-1]["iteration"] == 6
