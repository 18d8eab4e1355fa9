"""Aggregate finished runs into the comparison table: one group per task and label fraction, one
row per backbone, ``mean ± std`` over seeds per metric, the best mean of each column marked, and
the paired difference against the reference backbone with its bootstrap interval (:mod:`.stats`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from .plan import Run
from .results import METRICS, PAIRED, Metric, Scores, read_scores
from .stats import N_RESAMPLES, PairedDifference, average_cases, mean_std, paired_bootstrap


@dataclass
class Row:
    """One backbone in one group.

    Attributes:
        cells: ``{metric name: (mean, std, seeds)}`` over the finished seeds.
        best: the metric names where this row has the best mean of its group.
        n_cases: test cases (entries) a run is scored on.
        paired: the paired difference against the reference (None for the reference itself).
    """

    backbone: str
    cells: dict[str, tuple[float, float, int]]
    n_cases: int
    split: str
    seeds: list[int]
    best: set[str] = field(default_factory=set)
    paired: PairedDifference | None = None
    is_reference: bool = False


@dataclass
class Group:
    """The rows of one task at one label fraction."""

    task: str
    kind: str
    fraction: float
    rows: list[Row]
    reference: str | None

    @property
    def metrics(self) -> tuple[Metric, ...]:
        """The group's columns."""
        return METRICS[self.kind]


def _row(backbone: str, runs: Sequence[Run], scores: Sequence[Scores]) -> Row:
    """A backbone's row from the scores of its finished seeds."""
    cells = {m.name: mean_std([s.metrics[m.name] for s in scores]) for m in METRICS[runs[0].task.kind]}
    n_cases = max((len(s.cases) for s in scores), default=0)
    split = scores[0].split if scores else "test"
    seeds = [r.seed for r, s in zip(runs, scores)]
    return Row(backbone, cells, n_cases, split, seeds)


def mark_best(rows: Sequence[Row], metrics: Sequence[Metric]) -> None:
    """Put each metric's name in ``best`` of the row(s) with the best mean (ties: all of them).

    Nothing is marked with fewer than two rows that have a value: a best of one is no news.
    """
    for metric in metrics:
        scored = [r for r in rows if not math.isnan(r.cells[metric.name][0])]
        if len(scored) < 2:
            continue
        pick = max if metric.higher_is_better else min
        best = pick(r.cells[metric.name][0] for r in scored)
        for row in scored:
            if math.isclose(row.cells[metric.name][0], best, rel_tol=1e-12, abs_tol=1e-15):
                row.best.add(metric.name)


def _group(task_runs: Sequence[Run], reference: str, n_resamples: int, seed: int) -> Group:
    """One task at one fraction: rows in the plan's backbone order, best marked, paired differences."""
    first = task_runs[0]
    by_backbone: dict[str, list[tuple[Run, Scores]]] = {}
    for run in task_runs:
        by_backbone.setdefault(run.backbone.name, [])
        scores = read_scores(run.task.kind, run.out_dir)
        if scores is not None:
            by_backbone[run.backbone.name].append((run, scores))
    rows, cases = [], {}
    for name, done in by_backbone.items():
        if done:
            rows.append(_row(name, [r for r, _ in done], [s for _, s in done]))
            cases[name] = average_cases([s.cases for _, s in done])
    ref = reference if reference in cases else None
    for row in rows:
        row.is_reference = row.backbone == ref
        if ref is not None and not row.is_reference:
            row.paired = paired_bootstrap(cases[row.backbone], cases[ref], n_resamples, seed)
    mark_best(rows, METRICS[first.task.kind])
    return Group(first.task.label, first.task.kind, first.fraction, rows, ref)


def aggregate(runs: Sequence[Run], reference: str, n_resamples: int = N_RESAMPLES, seed: int = 0) -> list[Group]:
    """The table of a plan from the runs that finished (a run without results.json is left out).

    Args:
        runs: the plan.
        reference: the backbone the others are compared with, case by case.
        n_resamples: bootstrap resamples.
        seed: the bootstrap's seed.

    Returns:
        The groups, in the plan's order of tasks and fractions; a group with no finished run has no rows.
    """
    keyed: dict[tuple[str, float], list[Run]] = {}
    for run in runs:
        keyed.setdefault((run.task.label, run.fraction), []).append(run)
    return [_group(group_runs, reference, n_resamples, seed) for group_runs in keyed.values()]


def paired_metric(group: Group) -> Metric:
    """The metric of the group's paired difference."""
    return next(m for m in group.metrics if m.name == PAIRED[group.kind])
