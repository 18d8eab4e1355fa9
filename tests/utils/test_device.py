"""Device resolution (dinov2/utils/device.py): auto, cpu, cuda per local rank, cuda:<index>."""

from __future__ import annotations

import pytest
import torch

from dinov2.utils.device import resolve_device


def test_device_choice():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="config key device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")


@pytest.mark.parametrize("visible, local_rank, expected", [
    (4, 3, 3),   # one process per GPU of a node: LOCAL_RANK picks it
    (1, 3, 0),   # SLURM binds one GPU per task: each process sees only its own, as device 0
])
def test_gpu_follows_local_rank_or_per_task_binding(monkeypatch, visible, local_rank, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert resolve_device("cuda", local_rank) == torch.device("cuda", expected)


def test_more_processes_than_visible_gpus_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="LOCAL_RANK=3 but only 2 CUDA devices"):
        resolve_device("cuda", 3)


def test_indexed_gpu_and_the_key_named_in_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="device=cuda:2 but only 2 CUDA devices"):
        resolve_device("cuda:2", key="device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", key="--device").type == "cpu"
    with pytest.raises(ValueError, match="--device=cuda but torch sees no CUDA device"):
        resolve_device("cuda", key="--device")
