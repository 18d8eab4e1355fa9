"""What a finished run scored: its headline metrics and one paired value per test case.

* ``seg`` (``results.json`` of segmentation finetuning): foreground-mean Dice, NSD and HD95 of
  ``test.summary`` (``validation_best`` when the dataset has no labelled test cases); the paired
  value of a case is its Dice averaged over the foreground classes that are defined for it.
* ``probe`` (``results.json`` of the linear probe): test accuracy, balanced accuracy and macro
  AUROC; the paired value of an entry is 1 when the chosen head classified it right, else 0
  (their mean is the accuracy).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Metric:
    """A column of the table: ``key`` in the run's summary, and which direction is better."""

    name: str
    key: str
    higher_is_better: bool = True
    digits: int = 3  # decimals shown: scores in [0, 1] get 3, distances in mm 2


METRICS = {
    "seg": (Metric("Dice", "mean_dice"), Metric("NSD", "mean_nsd"), Metric("HD95 mm", "mean_hd95", False, 2)),
    "probe": (Metric("accuracy", "accuracy"), Metric("balanced accuracy", "balanced_accuracy"),
              Metric("AUROC", "auroc_macro")),
}
# The metric whose per-case values are compared pairwise (the mean of the per-case values).
PAIRED = {"seg": "Dice", "probe": "accuracy"}


@dataclass(frozen=True)
class Scores:
    """One run: ``metrics`` ``{metric name: value}`` (NaN when absent), ``cases`` ``{case: paired value}``
    (NaN when undefined for that case), and the ``split`` they were measured on."""

    metrics: dict[str, float]
    cases: dict[str, float]
    split: str


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _unique_names(names: list[str]) -> list[str]:
    """Case names made unique (a repeated name gets ``#2``, ``#3``...), so pairs stay one to one."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def segmentation_scores(results: dict) -> Scores:
    """:class:`Scores` of a segmentation ``results.json`` (see the module docstring)."""
    split = "test" if results.get("test") else "validation"
    block = results.get("test") or results.get("validation_best") or {}
    summary = block.get("summary") or {}
    metrics = {m.name: _number(summary.get(m.key)) for m in METRICS["seg"]}
    channels = results.get("channels") or []
    foreground = [channels[k] for k in results.get("foreground_channels") or []]
    cases = block.get("cases") or []
    values = []
    for case in cases:
        dice = [_number((case.get("dice") or {}).get(name)) for name in foreground]
        defined = [d for d in dice if not math.isnan(d)]
        values.append(sum(defined) / len(defined) if defined else math.nan)
    names = _unique_names([str(c.get("name")) for c in cases])
    return Scores(metrics, dict(zip(names, values)), split)


def probe_scores(results: dict) -> Scores:
    """:class:`Scores` of a linear-probe ``results.json`` (see the module docstring)."""
    split = "test" if results.get("test") else "validation"
    block = results.get("test") or results.get("validation") or {}
    metrics = {m.name: _number(block.get(m.key)) for m in METRICS["probe"]}
    entries = block.get("cases") or []
    names = _unique_names([str(e.get("name")) for e in entries])
    return Scores(metrics, {n: float(bool(e.get("correct"))) for n, e in zip(names, entries)}, split)


def read_scores(kind: str, out_dir: Path) -> Scores | None:
    """The :class:`Scores` of the run in ``out_dir``; None when it has no ``results.json``."""
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    return segmentation_scores(results) if kind == "seg" else probe_scores(results)
