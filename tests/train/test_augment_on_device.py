"""Pretraining with ``crops.augment_on_device``: the same run as without it on a CPU, and exact resume
of the vectorised form an accelerator runs (forced here on the CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from dinov2.data import device_augment
from dinov2.train import ssl_meta_arch, train3d

pytestmark = pytest.mark.usefixtures("one_thread")


def _resume_helpers():
    """``test_resume.py``'s run settings and comparisons (loaded by path: tests are not a package)."""
    path = Path(__file__).with_name("test_resume.py")
    spec = importlib.util.spec_from_file_location("resume_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


resume = _resume_helpers()
# The per-sample pipeline and the device path draw noise fields from different generators; with
# no noise every other parameter is the same draw, so the two runs can be compared bit for bit.
NO_NOISE = "crops.noise_std=0.0"


@pytest.fixture
def vectorised(monkeypatch) -> list:
    """Make the crops with the accelerators' vectorised kernels, here on the CPU; yields the calls."""
    calls = []

    def make_crops(crop_boxes, device):
        calls.append(device)
        return device_augment.make_crops(crop_boxes, device, vectorised=True)

    monkeypatch.setattr(ssl_meta_arch, "make_crops", make_crops)
    return calls


def test_crops_made_by_the_training_process_train_exactly_as_the_workers_crops(tmp_path, tiny_argv):
    on, off = tmp_path / "on", tmp_path / "off"
    train3d.main(tiny_argv(on, *resume._run_overrides(NO_NOISE, "crops.augment_on_device=true")))
    train3d.main(tiny_argv(off, *resume._run_overrides(NO_NOISE)))
    resume._assert_same_run(on, off)


def test_vectorised_crops_train_and_resume_exactly(tmp_path, tiny_argv, vectorised, monkeypatch):
    overrides = resume._run_overrides("crops.augment_on_device=true")
    reference = tmp_path / "reference"
    train3d.main(tiny_argv(reference, *overrides))
    assert len(vectorised) == resume.N_ITERATIONS
    losses = [line["total_loss"] for line in resume._metric_values(reference)]
    assert len(losses) == resume.N_ITERATIONS and all(abs(v) < 1e3 for v in losses)  # finite, not blown up

    real_step = train3d.seed_training_step

    def stop_at_3(seed, iteration, rank):
        if iteration == 3:
            raise resume.SimulatedKill()
        real_step(seed, iteration, rank)

    killed = tmp_path / "killed"
    monkeypatch.setattr(train3d, "seed_training_step", stop_at_3)
    with pytest.raises(resume.SimulatedKill):
        train3d.main(tiny_argv(killed, *overrides))
    monkeypatch.setattr(train3d, "seed_training_step", real_step)
    train3d.main(tiny_argv(killed, *overrides))
    resume._assert_same_run(killed, reference)
