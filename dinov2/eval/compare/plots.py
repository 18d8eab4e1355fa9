"""PNG plots of a comparison, under ``<output-dir>/plots/``:

* ``<task>_bars.png``: per task, one panel per metric, a bar per backbone (mean over seeds, error
  bar = std over seeds), at the task's largest label fraction;
* ``<task>_fractions.png``: when several fractions were run, the paired metric (Dice, or accuracy
  for a probe) against the label fraction, one line per backbone with std error bars.

matplotlib is optional: without it, no PNG and one log line (the tables are written anyway).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

from dinov2.plot.backend import pyplot, save
from dinov2.plot.errors import PlotError

from .table import Group, paired_metric

logger = logging.getLogger("dinov2.eval.compare")


def _zero_nan(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def bar_chart(group: Group, path: Path) -> Path:
    """Bars with error bars of every metric of one group (one task, one fraction)."""
    plt = pyplot()
    metrics = group.metrics
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), squeeze=False)
    names = [r.backbone for r in group.rows]
    colours = [f"C{i}" for i in range(len(names))]
    for ax, metric in zip(axes[0], metrics):
        means = [_zero_nan(r.cells[metric.name][0]) for r in group.rows]
        stds = [_zero_nan(r.cells[metric.name][1]) for r in group.rows]
        ax.bar(range(len(names)), means, yerr=stds, color=colours, capsize=4)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_title(f"{metric.name} ({'higher' if metric.higher_is_better else 'lower'} is better)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    seeds = max((len(r.seeds) for r in group.rows), default=0)
    fig.suptitle(f"{group.task}, {group.fraction:g} % of the training set (mean ± std over up to {seeds} seeds)",
                 fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def fraction_curve(groups: Sequence[Group], path: Path) -> Path:
    """The paired metric against the label fraction, one line per backbone, for one task's groups."""
    plt = pyplot()
    metric = paired_metric(groups[0])
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    backbones = list(dict.fromkeys(r.backbone for g in groups for r in g.rows))
    for name in backbones:
        points = [(g.fraction, r.cells[metric.name]) for g in groups for r in g.rows if r.backbone == name]
        points = [(f, c) for f, c in points if not math.isnan(c[0])]
        ax.errorbar([f for f, _ in points], [c[0] for _, c in points], yerr=[_zero_nan(c[1]) for _, c in points],
                    marker="o", capsize=3, label=name)
    ax.set(xlabel="label fraction (% of the training set)", ylabel=metric.name, title=f"{groups[0].task}: "
           f"{metric.name} vs label fraction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def _by_task(groups: Sequence[Group]) -> dict[str, list[Group]]:
    out: dict[str, list[Group]] = {}
    for group in groups:
        if group.rows:
            out.setdefault(group.task, []).append(group)
    return out


def write_plots(groups: Sequence[Group], output_dir: Path) -> list[Path]:
    """Every PNG of the module docstring; without matplotlib none, and one log line says why.

    Returns:
        The PNGs written.
    """
    plot_dir = Path(output_dir) / "plots"
    written = []
    try:
        for task, task_groups in _by_task(groups).items():
            stem = task.replace(":", "-")
            largest = max(task_groups, key=lambda g: g.fraction)
            written.append(bar_chart(largest, plot_dir / f"{stem}_bars.png"))
            if len(task_groups) > 1:
                ordered = sorted(task_groups, key=lambda g: g.fraction)
                written.append(fraction_curve(ordered, plot_dir / f"{stem}_fractions.png"))
    except PlotError as exc:
        logger.info("No comparison plots: %s The tables are complete.", " ".join(str(exc).split()))
    return written
