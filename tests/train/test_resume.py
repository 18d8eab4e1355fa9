"""Kill-and-resume equivalence: a run interrupted anywhere ends with the same teacher, bit for bit."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from dinov2.checkpoints import training_state as checkpointer_module
from dinov2.checkpoints.training_state import TrainingCheckpointer
from dinov2.train import train3d

N_ITERATIONS = 6
TIMING_KEYS = {"samples_per_s", "iterations_per_s", "data_wait_s", "data_wait_share"}


def _run_overrides(*extra):
    return (f"train.max_iterations={N_ITERATIONS}", "checkpointing.period_iterations=2", "checkpointing.max_to_keep=2",
            f"evaluation.eval_period_iterations={N_ITERATIONS}", *extra)


def _final_teacher(run_dir) -> dict[str, torch.Tensor]:
    path = run_dir / "eval" / f"training_{N_ITERATIONS}" / "teacher_checkpoint.pth"
    return torch.load(path, weights_only=True)["teacher"]


def _metric_values(run_dir) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "training_metrics.json").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]


def _assert_same_run(run_dir, reference_dir):
    reference = _final_teacher(reference_dir)
    resumed = _final_teacher(run_dir)
    assert reference.keys() == resumed.keys()
    different = [k for k in reference if not torch.equal(reference[k], resumed[k])]
    assert not different, f"teacher tensors differ after resuming: {different[:5]}"
    assert _metric_values(run_dir) == _metric_values(reference_dir)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_argv):
    run = tmp_path_factory.mktemp("reference")
    train3d.main(tiny_argv(run, *_run_overrides()))
    return run


class SimulatedKill(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler in the trainer swallows it."""


def test_killed_while_writing_a_checkpoint(tmp_path, tiny_argv, reference_run, monkeypatch):
    real_save = checkpointer_module.atomic_torch_save

    def dies_half_way(obj, path):
        if obj["iteration"] == 4:
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            data = buffer.getvalue()
            # What a kill leaves behind: a partial temporary file next to the real ones.
            (path.parent / f".{path.name}.x1y2.tmp").write_bytes(data[: len(data) // 2])
            raise SimulatedKill()
        return real_save(obj, path)

    monkeypatch.setattr(checkpointer_module, "atomic_torch_save", dies_half_way)
    with pytest.raises(SimulatedKill):
        train3d.main(tiny_argv(tmp_path, *_run_overrides()))
    monkeypatch.undo()
    checkpoints = TrainingCheckpointer(tmp_path)
    assert [it for it, _ in checkpoints.list()] == [2]
    assert list(checkpoints.directory.glob(".model_0000004.pth.*.tmp"))

    train3d.main(tiny_argv(tmp_path, *_run_overrides()))
    assert not list(checkpoints.directory.glob("*.tmp"))
    assert [it for it, _ in checkpoints.list()] == [4, 6]
    _assert_same_run(tmp_path, reference_run)


def test_killed_between_iterations_with_prefetching_workers(tmp_path, tiny_argv, reference_run, monkeypatch):
    # Stop after iteration 3 (mid-way between checkpoints 2 and 4): the loader's workers had
    # already prepared later batches, which the resumed run must not skip.
    real_step = train3d.seed_training_step

    def stop_at_3(seed, iteration, rank):
        if iteration == 3:
            raise SimulatedKill()
        real_step(seed, iteration, rank)

    monkeypatch.setattr(train3d, "seed_training_step", stop_at_3)
    with pytest.raises(SimulatedKill):
        train3d.main(tiny_argv(tmp_path, *_run_overrides("train.prefetch_factor=4")))
    monkeypatch.undo()
    assert [it for it, _ in TrainingCheckpointer(tmp_path).list()] == [2]
    train3d.main(tiny_argv(tmp_path, *_run_overrides()))
    _assert_same_run(tmp_path, reference_run)


@pytest.mark.slow
def test_sigkill_at_a_random_moment(tmp_path, tiny_argv, reference_run):
    # Checkpoint every iteration so the kill can land in a save as well as in a step.
    argv = tiny_argv(tmp_path, *_run_overrides("checkpointing.period_iterations=1"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "subprocess.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "dinov2.train.train3d", *argv], env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        first = tmp_path / "checkpoints" / "model_0000001.pth"
        deadline = time.monotonic() + 240
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.exists(), f"the subprocess never wrote its first checkpoint:\n{log.read_text()[-3000:]}"
        time.sleep(random.uniform(0.0, 0.6))  # an iteration takes ~0.1-0.3 s here
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    done = [it for it, _ in TrainingCheckpointer(tmp_path).list()]
    assert done and done[-1] <= N_ITERATIONS
    train3d.main(tiny_argv(tmp_path, *_run_overrides("checkpointing.period_iterations=1")))
    _assert_same_run(tmp_path, reference_run)
