"""Atomic torch.save (dinov2/utils/io.py): the old file or the new one, never half of either."""

from __future__ import annotations

import os

import pytest
import torch

from dinov2.utils.io import atomic_torch_save


def test_writes_creates_folders_and_leaves_no_temporary_file(tmp_path):
    path = atomic_torch_save({"w": torch.arange(3)}, tmp_path / "a" / "b.pth")
    assert path == tmp_path / "a" / "b.pth" and os.listdir(path.parent) == ["b.pth"]
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = atomic_torch_save({"v": 1}, tmp_path / "x.pth")
    before = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"v": 2}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["x.pth"]
