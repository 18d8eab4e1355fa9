"""``comparison.md`` and ``comparison.csv`` of a comparison's table (:mod:`.table`)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

from .results import Metric
from .stats import FEW_CASES, N_RESAMPLES, PairedDifference
from .table import Group, Row, paired_metric

CSV_COLUMNS = ("task", "fraction", "backbone", "metric", "higher_is_better", "mean", "std", "seeds", "cases",
               "split", "best", "reference", "paired_diff", "ci_low", "ci_high", "paired_cases", "verdict")


def _fmt(value: float, metric: Metric, sign: bool = False) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:{'+' if sign else ''}.{metric.digits}f}"


def _cell(row: Row, metric: Metric) -> str:
    """``mean ± std`` (std n/a with one seed); bold when it is the column's best."""
    mean, std, n = row.cells[metric.name]
    if n == 0:
        return "n/a"
    text = _fmt(mean, metric) + (f" ± {_fmt(std, metric)}" if n > 1 else "")
    return f"**{text}**" if metric.name in row.best else text


def _paired_cell(row: Row, metric: Metric) -> str:
    """``+0.050 [+0.020, +0.080] better`` against the reference; ``reference`` for the reference."""
    if row.is_reference:
        return "reference"
    p = row.paired
    if p is None or p.n == 0:
        return "n/a (no paired cases)"
    interval = f" [{_fmt(p.low, metric, True)}, {_fmt(p.high, metric, True)}]" if p.n > 1 else ""
    return f"{_fmt(p.mean, metric, True)}{interval} {p.verdict(metric.higher_is_better)}"


def group_markdown(group: Group) -> list[str]:
    """The lines of one group's Markdown table (heading included)."""
    lines = [f"## {group.task}, {group.fraction:g} % of the training set", ""]
    if not group.rows:
        return lines + ["No finished run yet.", ""]
    paired = paired_metric(group)
    arrows = [f"{m.name} {'↑' if m.higher_is_better else '↓'}" for m in group.metrics]
    versus = f"{paired.name}: paired diff vs {group.reference} [95 % CI]" if group.reference else None
    header = ["backbone", *arrows, "seeds", "cases", *([versus] if versus else [])]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in group.rows:
        cells = [row.backbone, *(_cell(row, m) for m in group.metrics), str(len(row.seeds)),
                 f"{row.n_cases}{'' if row.split == 'test' else ' (validation)'}"]
        if versus:
            cells.append(_paired_cell(row, paired))
        lines.append("| " + " | ".join(cells) + " |")
    few = [r.n_cases for r in group.rows if 0 < r.n_cases < FEW_CASES]
    if few and group.reference:
        lines += ["", f"Only {min(few)} test cases: a bootstrap interval over so few cases is too narrow to trust, "
                      "so no verdict is given; a difference that looks large can still be noise."]
    return lines + [""]


def reading_notes(reference: str | None, n_resamples: int, missing: Sequence[str]) -> list[str]:
    """How to read the tables, and which planned runs are not in them."""
    lines = ["## How to read these tables", "",
             "- Each cell is the mean ± sample standard deviation over seeds (one seed: no ± part); **bold** is the "
             "best mean of its column in its table (↑ higher is better, ↓ lower is better).",
             "- seeds: finished runs in the row; cases: test cases (entries, for a probe) each run is scored on. "
             "Every run of a table trains on the same nested subset of the training set.",
             "- Segmentation: foreground-mean Dice, NSD and HD95 (mm) on the test cases. Probe: accuracy, balanced "
             "accuracy and macro AUROC of the chosen linear head on the test entries."]
    if reference:
        lines.append(f"- Paired difference: each case's value (segmentation: its foreground-mean Dice; probe: 1 if "
                     f"classified right, else 0) is averaged over a backbone's seeds, then the reference ({reference}) "
                     f"is subtracted case by case. The interval is the 2.5-97.5 percentile range of the mean "
                     f"difference over {n_resamples} bootstrap resamples of the cases (seeded). 'better' / 'worse': "
                     "the interval excludes 0; 'within noise': it contains 0, so these test cases cannot tell the "
                     f"two backbones apart; 'too few cases': fewer than {FEW_CASES}, no verdict. The interval covers "
                     "the choice of test cases, not the seeds (see ± std).")
    if missing:
        lines += ["", f"Not in the tables ({len(missing)} runs did not finish): " + "; ".join(missing) + "."]
    return lines + [""]


def markdown(groups: Sequence[Group], reference: str | None, n_resamples: int = N_RESAMPLES,
             missing: Sequence[str] = ()) -> str:
    """The whole ``comparison.md``."""
    lines = ["# Backbone comparison", ""]
    for group in groups:
        lines += group_markdown(group)
    return "\n".join(lines + reading_notes(reference, n_resamples, missing))


def csv_rows(groups: Sequence[Group]) -> list[dict]:
    """One dict per task x fraction x backbone x metric (:data:`CSV_COLUMNS`)."""
    rows = []
    for group in groups:
        paired_name = paired_metric(group).name
        for row in group.rows:
            for metric in group.metrics:
                mean, std, n = row.cells[metric.name]
                record = {"task": group.task, "fraction": f"{group.fraction:g}", "backbone": row.backbone,
                          "metric": metric.name, "higher_is_better": int(metric.higher_is_better),
                          "mean": _number(mean), "std": _number(std), "seeds": n, "cases": row.n_cases,
                          "split": row.split, "best": int(metric.name in row.best), "reference": group.reference or ""}
                if metric.name == paired_name and row.paired is not None:
                    record.update(_paired_columns(row.paired, metric))
                rows.append(record)
    return rows


def _paired_columns(p: PairedDifference, metric: Metric) -> dict:
    return {"paired_diff": _number(p.mean), "ci_low": _number(p.low), "ci_high": _number(p.high),
            "paired_cases": p.n, "verdict": p.verdict(metric.higher_is_better)}


def _number(value: float) -> str:
    """A CSV number: full precision, empty when undefined."""
    return "" if value is None or math.isnan(value) else repr(float(value))


def write_reports(groups: Sequence[Group], output_dir: Path, reference: str | None, n_resamples: int = N_RESAMPLES,
                  missing: Sequence[str] = ()) -> tuple[Path, Path, str]:
    """Write ``comparison.md`` and ``comparison.csv`` under ``output_dir``.

    Returns:
        ``(markdown path, csv path, the markdown text)``.
    """
    output_dir = Path(output_dir)
    text = markdown(groups, reference, n_resamples, missing)
    md_path, csv_path = output_dir / "comparison.md", output_dir / "comparison.csv"
    md_path.write_text(text, encoding="utf-8")
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(csv_rows(groups))
    return md_path, csv_path, text
