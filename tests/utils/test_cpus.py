"""DataLoader workers never exceed the CPUs available to the process (one is left to the main one)."""

import logging
import os

import pytest

from dinov2.utils import cpus


@pytest.fixture
def two_cpus(monkeypatch):
    monkeypatch.setattr(cpus, "available_cpus", lambda: 2)


def test_available_cpus_is_the_affinity_set_and_at_least_one():
    count = cpus.available_cpus()
    assert count >= 1
    if hasattr(os, "sched_getaffinity"):
        assert count == len(os.sched_getaffinity(0))


def test_available_cpus_falls_back_to_cpu_count(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # os.cpu_count may not know
    assert cpus.available_cpus() == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert cpus.available_cpus() == 6


def test_too_many_workers_are_capped_with_one_line_naming_the_key(two_cpus, caplog):
    with caplog.at_level(logging.INFO, logger="dinov2"):
        assert cpus.cap_workers(10, "train.num_workers") == 1
    assert [r.getMessage() for r in caplog.records] == [
        "train.num_workers=10 lowered to 1: 2 CPUs available to this process"]


def test_workers_that_fit_are_kept_silently(two_cpus, caplog):
    with caplog.at_level(logging.INFO, logger="dinov2"):
        assert cpus.cap_workers(1, "train.num_workers") == 1
        assert cpus.cap_workers(0, "train.num_workers") == 0
    assert caplog.records == []


def test_one_cpu_loads_in_the_main_process(monkeypatch, caplog):
    monkeypatch.setattr(cpus, "available_cpus", lambda: 1)
    with caplog.at_level(logging.INFO, logger="dinov2"):
        assert cpus.cap_workers(4, "--num-workers") == 0
    assert "--num-workers=4 lowered to 0: 1 CPU available" in caplog.text


def test_linear_probe_feature_loader_workers_are_capped(two_cpus, monkeypatch, tmp_path):
    """The linear probe's extraction loader gets at most CPUs - 1 workers, like the training loaders."""
    import torch

    from dinov2.eval.linear import features

    seen = {}

    class Stop(Exception):
        pass

    def fake_loader(dataset, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(features, "DataLoader", fake_loader)
    model = torch.nn.Linear(1, 1)
    with pytest.raises(Stop):
        features.load_or_extract_features(model, [{"image": str(tmp_path / "x.nii.gz"), "label": 0}], split="training",
                                          checkpoint=None, cache_dir=None, preprocessing=None, image_size=16,
                                          n_last_blocks=1, num_workers=8)
    assert seen["num_workers"] == 1
