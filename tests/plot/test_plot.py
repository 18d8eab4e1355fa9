"""python -m dinov2.plot: the PNGs of pretraining, segmentation and linear-probe runs, and its errors."""

from __future__ import annotations

import builtins
import json
import math
from pathlib import Path

import numpy as np
import pytest

from dinov2.plot import PlotError, plot_run
from dinov2.plot.__main__ import main
from dinov2.plot.pretraining import watch_thresholds

pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

COLLAPSE_RED = np.array([0xD6, 0x27, 0x28]) / 255


def _pixels_near(png: Path, colour: np.ndarray, tol: float = 0.15) -> int:
    image = imread(png)[..., :3]
    return int((np.abs(image - colour).max(axis=-1) < tol).sum())


def _pretraining_run(tmp_path: Path, k: int = 64) -> Path:
    run = tmp_path / "pretrain"
    run.mkdir()
    ln_k = math.log(k)
    records = [{"iteration": 10 * i + 9, "total_loss": 6 - 0.1 * i, "dino_loss": ln_k * (1 - 0.01 * i),
                "ibot_loss": 0.5 * ln_k * (1 - 0.01 * i), "koleo_loss": 0.5 - 0.1 * i, "lr": 1e-3, "wd": 0.04,
                "teacher_temp": 0.04, "momentum": 0.992, "samples_per_s": 90.0, "data_wait_share": 0.2,
                "dino_uniform_loss": ln_k, "ibot_uniform_loss": 0.5 * ln_k, "teacher_entropy": 0.6 * ln_k,
                "teacher_prototype_entropy": 0.9 * ln_k, "teacher_cls_effective_rank": 5.0 + i}
               for i in range(20)]
    (run / "training_metrics.json").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (run / "config.yaml").write_text(f"dino:\n  head_n_prototypes: {k}\ntrain:\n  collapse_watch:\n"
                                     "    teacher_entropy_fraction: 0.9\n")
    return run


def test_pretraining_run_gets_every_png_with_the_collapse_line(tmp_path):
    run = _pretraining_run(tmp_path)
    written = plot_run(run)
    assert [p.name for p in written] == ["losses.png", "learning.png", "schedules.png", "collapse_monitors.png",
                                         "throughput.png"]
    assert all(p.parent == run / "plots" and p.stat().st_size > 5000 for p in written)
    assert not list((run / "plots").glob("*.partial.png"))
    # the red "uniform prediction" / watch-threshold lines are drawn on the learning and monitor plots
    assert _pixels_near(run / "plots" / "learning.png", COLLAPSE_RED) > 200
    assert _pixels_near(run / "plots" / "collapse_monitors.png", COLLAPSE_RED) > 500


def test_thresholds_come_from_the_runs_config(tmp_path):
    thresholds = watch_thresholds(_pretraining_run(tmp_path, k=256))
    assert thresholds["ln_k"] == pytest.approx(math.log(256))
    assert thresholds["teacher_entropy_fraction"] == 0.9  # from the run
    assert thresholds["prototype_entropy_fraction"] == 0.05  # packaged default


def test_segmentation_and_probe_runs(tmp_path):
    seg = tmp_path / "seg"
    seg.mkdir()
    (seg / "results.json").write_text(json.dumps({
        "dataset": "brain_tissue", "head": "UNETR", "best": {"iteration": 20, "mean_dice": 0.6},
        "curves": {"train": [{"iteration": i, "loss": 2.0 / i, "lr": 1e-4} for i in range(1, 31)],
                   "validation": [{"iteration": i, "mean_dice": 0.02 * i} for i in (10, 20, 30)]}}))
    assert [p.name for p in plot_run(seg)] == ["finetuning.png"]
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "metrics.jsonl").write_text("\n".join(json.dumps(
        {"iteration": i, "train_loss": 1.0, "val_accuracy": {"a": 0.1 * i, "b": 0.05 * i}}) for i in (1, 2, 3)))
    (probe / "results.json").write_text(json.dumps({"best_classifier": {"name": "a"}}))
    assert [p.name for p in plot_run(probe, tmp_path / "elsewhere")] == ["probe_grid.png"]
    assert (tmp_path / "elsewhere" / "probe_grid.png").stat().st_size > 5000


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR: Nothing to plot in") and str(tmp_path) in err[0]
    (tmp_path / "training_metrics.json").write_text("{not json\n")
    assert main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ERROR:") and "training_metrics.json" in err and "Traceback" not in err


def test_without_matplotlib_the_command_says_what_to_install(tmp_path, monkeypatch, capsys):
    run = _pretraining_run(tmp_path)
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(PlotError, match="pip install matplotlib"):
        plot_run(run)
    assert main([str(run)]) == 1
    assert "pip install matplotlib" in capsys.readouterr().err


def test_plot_at_end_never_fails_a_finished_run(tmp_path, monkeypatch, caplog):
    import logging

    from dinov2.plot import plot_at_end, run as run_module

    run = _pretraining_run(tmp_path)
    with caplog.at_level(logging.INFO, logger="dinov2.plot"):
        assert [p.name for p in plot_at_end(run)][:2] == ["losses.png", "learning.png"]
    assert "Curves as PNG in" in caplog.text

    def broken(*args, **kwargs):
        raise RuntimeError("a font cache problem")

    monkeypatch.setattr(run_module, "pretraining_figures", broken)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dinov2.plot"):
        assert plot_at_end(run) == []
    assert "a font cache problem" in caplog.text and f"python -m dinov2.plot {run}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dinov2.plot"):
        assert plot_at_end(tmp_path / "empty") == []
    assert "No PNG curves" in caplog.text
