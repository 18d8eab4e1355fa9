"""Writing teacher checkpoints (dinov2/checkpoints/teacher_export.py): atomic, validated, plain configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dinov2.checkpoints.teacher_export import save_teacher_checkpoint, to_plain_config, to_published_layout
from dinov2.models import vit_tiny_3d


def test_save_teacher_checkpoint_is_atomic_and_validates(tmp_path, monkeypatch):
    src = vit_tiny_3d(img_size=32, depth=1)
    teacher = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    cfg = {"student": {"arch": "vit_tiny_3d", "depth": 1}, "crops": {"global_crops_size": 32}}
    path = save_teacher_checkpoint(tmp_path / "t.pth", teacher, cfg, iteration=1)
    before = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_teacher_checkpoint(path, teacher, cfg, iteration=2)
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["t.pth"]

    with pytest.raises(ValueError, match=r"config\.student\.bad"):
        save_teacher_checkpoint(path, teacher, {"student": {"bad": object()}}, iteration=1)
    with pytest.raises(ValueError, match="backbone"):
        save_teacher_checkpoint(path, {"dino_head.w": torch.zeros(1)}, cfg, iteration=1)
    with pytest.raises(ValueError, match="iteration"):
        save_teacher_checkpoint(path, teacher, cfg, iteration=-1)
    with pytest.raises(ValueError, match="student"):
        save_teacher_checkpoint(path, teacher, {"crops": {}}, iteration=1)
    assert to_plain_config({"a": (1, Path("x"))}) == {"a": [1, "x"]}
    with pytest.raises(ValueError, match="divide the depth"):
        to_published_layout({"blocks.0.w": torch.zeros(1), "blocks.1.w": torch.zeros(1)}, block_chunks=3)
