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
