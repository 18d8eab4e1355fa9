"""The PNGs of a pretraining run, from its ``training_metrics.json`` records."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from dinov2.train.curves import RATIOS, ratio_series
from dinov2.utils.config import packaged_config_path

from .backend import pyplot, save

LOSSES = ("total_loss", "dino_loss", "ibot_loss", "koleo_loss")
SCHEDULES = (("lr", "learning rate"), ("wd", "weight decay"), ("teacher_temp", "teacher temperature"),
             ("momentum", "EMA momentum"))
# The small recipe's "learned" targets (docs/experiments/small_scale_recipe.md): dashed lines.
TARGETS = {"DINO loss / ln K": 0.8, "iBOT loss / uniform": 0.8, "teacher entropy / ln K": 0.7}


def _series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """Iterations (1-based) and finite values of ``key`` in the records that hold it."""
    points = [(int(r["iteration"]) + 1, float(r[key])) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
    return [p[0] for p in points], [p[1] for p in points]


def watch_thresholds(run_dir: Path) -> dict:
    """The collapse watch's thresholds and ``K`` of the run (its config.yaml, else the packaged defaults)."""
    cfg = OmegaConf.load(packaged_config_path("ssl3d_default_config"))
    path = run_dir / "config.yaml"
    if path.is_file():
        cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
    watch = cfg.train.collapse_watch
    return {"ln_k": math.log(int(cfg.dino.head_n_prototypes)),
            "teacher_entropy_fraction": float(watch.teacher_entropy_fraction),
            "prototype_entropy_fraction": float(watch.prototype_entropy_fraction),
            "min_cls_effective_rank": float(watch.min_cls_effective_rank)}


def losses_figure(records: Sequence[dict], path: Path) -> Path:
    """Every loss term over iterations; log scale unless a term goes negative (KoLeo can)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in LOSSES:
        its, values = _series(records, key)
        if its:
            ax.plot(its, values, label=key.replace("_", " "), lw=1.2)
    if all(v > 0 for key in LOSSES for v in _series(records, key)[1]):
        ax.set_yscale("log")
    ax.set(xlabel="iteration", ylabel="loss", title="Losses (a falling total proves nothing: see learning.png)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save(fig, path)


def learning_figure(records: Sequence[dict], path: Path) -> Path:
    """Each loss and the teacher entropy over its uniform value: 1 = collapsed, the targets dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {label: colour for _, _, label, colour in RATIOS}
    for label, points in ratio_series(records).items():
        ax.plot([p[0] for p in points], [p[1] for p in points], color=colours[label], lw=1.2, label=label)
        ax.axhline(TARGETS[label], color=colours[label], ls=":", lw=1)
    ax.axhline(1.0, color="#d62728", ls="--", lw=1.5, label="uniform prediction (collapsed)")
    ax.set(xlabel="iteration", ylabel="value / uniform value", ylim=(0, 1.15),
           title="Learning: below the red line; dotted = the small recipe's targets")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    return save(fig, path)


def schedules_figure(records: Sequence[dict], path: Path) -> Path:
    """LR, weight decay, teacher temperature and EMA momentum, one panel each."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9, 5), sharex=True)
    for ax, (key, label) in zip(axes.flat, SCHEDULES):
        its, values = _series(records, key)
        ax.plot(its, values, lw=1.2)
        ax.set(title=label)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    fig.suptitle("Schedules")
    fig.tight_layout()
    return save(fig, path)


def collapse_figure(records: Sequence[dict], thresholds: dict, path: Path) -> Path:
    """The collapse monitors with the lines where the watch warns."""
    plt = pyplot()
    ln_k = thresholds["ln_k"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = (("teacher_entropy", "teacher entropy (per sample)", [(ln_k, "ln K (uniform)", "--"),
              (thresholds["teacher_entropy_fraction"] * ln_k, "watch warns above", ":")]),
              ("teacher_prototype_entropy", "prototype-usage entropy", [(ln_k, "ln K (all used)", "--"),
              (thresholds["prototype_entropy_fraction"] * ln_k, "watch warns below", ":")]),
              ("teacher_cls_effective_rank", "CLS effective rank", [(thresholds["min_cls_effective_rank"],
              "watch warns below", ":")]))
    for ax, (key, title, lines) in zip(axes, panels):
        its, values = _series(records, key)
        ax.plot(its, values, lw=1.2, label=title)
        for value, label, style in lines:
            ax.axhline(value, color="#d62728", ls=style, lw=1.2, label=label)
        ax.set(title=title, xlabel="iteration")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, path)


def throughput_figure(records: Sequence[dict], path: Path) -> Path:
    """Samples/s and the share of time spent waiting for data."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    its, speed = _series(records, "samples_per_s")
    ax.plot(its, speed, lw=1.2, color="#1f77b4")
    ax.set(xlabel="iteration", ylabel="samples / s", title="Throughput")
    ax.grid(alpha=0.3)
    its, wait = _series(records, "data_wait_share")
    if its:
        twin = ax.twinx()
        twin.plot(its, wait, lw=1, color="#ff7f0e")
        twin.set(ylabel="data-wait share", ylim=(0, 1))
    return save(fig, path)


def pretraining_figures(records: Sequence[dict], run_dir: Path, out_dir: Path) -> list[Path]:
    """All pretraining PNGs of ``records`` into ``out_dir``; returns their paths."""
    return [losses_figure(records, out_dir / "losses.png"), learning_figure(records, out_dir / "learning.png"),
            schedules_figure(records, out_dir / "schedules.png"),
            collapse_figure(records, watch_thresholds(run_dir), out_dir / "collapse_monitors.png"),
            throughput_figure(records, out_dir / "throughput.png")]
