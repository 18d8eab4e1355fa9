"""Mean and spread over seeds, and the paired bootstrap that says whether a difference is noise.

The paired difference of backbone B against the reference R on a task is taken case by case:
each case's value is first averaged over the seeds of each backbone, then ``d_i = B_i - R_i``.
Resampling the cases with replacement (``n_resamples`` times, seeded) gives the distribution of
the mean difference; its 2.5th and 97.5th percentiles are the 95 % confidence interval. An
interval that contains 0 means the test cases cannot tell the two apart: the "better" one may be
noise. The interval covers case sampling only; the spread over seeds is the table's ``± std``.
With fewer than :data:`FEW_CASES` cases no verdict is given: the interval is shown, but a
bootstrap over a handful of cases is too narrow to trust.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

N_RESAMPLES = 2000
# Below this many cases a bootstrap interval is too coarse (and too narrow) to mean much: no verdict.
FEW_CASES = 10


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """``(mean, sample std (ddof 1), n)`` of the finite values; NaN std with fewer than 2, NaN mean with none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return math.nan, math.nan, 0
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    return float(np.mean(finite)), std, len(finite)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``B - R`` over ``n`` paired cases and its bootstrap 95 % interval (NaN below 2 cases)."""

    mean: float
    low: float
    high: float
    n: int

    def verdict(self, higher_is_better: bool = True) -> str:
        """``better`` / ``worse`` when the interval excludes 0 (in the metric's direction), else ``within noise``;
        ``too few cases`` below :data:`FEW_CASES` (a bootstrap over a handful of cases is too narrow to trust)."""
        if self.n < FEW_CASES or math.isnan(self.low):
            return "too few cases"
        if self.low > 0 or self.high < 0:
            return "better" if (self.low > 0) == higher_is_better else "worse"
        return "within noise"


def paired_bootstrap(candidate: dict[str, float], reference: dict[str, float], n_resamples: int = N_RESAMPLES,
                     seed: int = 0, level: float = 0.95) -> PairedDifference:
    """Bootstrap interval of the mean per-case difference ``candidate - reference``.

    Args:
        candidate: ``{case: value}`` of backbone B (already averaged over its seeds).
        reference: ``{case: value}`` of the reference backbone R.
        n_resamples: bootstrap resamples of the cases.
        seed: the resampling's seed (the same inputs give the same interval).
        level: the interval's coverage.

    Returns:
        :class:`PairedDifference` over the cases both have a finite value for.
    """
    common = sorted(k for k in candidate.keys() & reference.keys()
                    if math.isfinite(candidate[k]) and math.isfinite(reference[k]))
    diffs = np.array([candidate[k] - reference[k] for k in common], dtype=np.float64)
    if diffs.size == 0:
        return PairedDifference(math.nan, math.nan, math.nan, 0)
    if diffs.size < 2:
        return PairedDifference(float(diffs.mean()), math.nan, math.nan, int(diffs.size))
    means = _resampled_means(diffs, n_resamples, seed)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return PairedDifference(float(diffs.mean()), float(low), float(high), int(diffs.size))


def _resampled_means(diffs: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """``(n_resamples,)`` means of ``diffs`` ``(n,)`` resampled with replacement, in chunks of at most
    a few million indices (a test set of 100k entries would otherwise need gigabytes)."""
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // diffs.size)
    parts = []
    for start in range(0, n_resamples, chunk):
        picks = rng.integers(0, diffs.size, size=(min(chunk, n_resamples - start), diffs.size))
        parts.append(diffs[picks].mean(axis=1))
    return np.concatenate(parts)


def average_cases(per_seed: Sequence[dict[str, float]]) -> dict[str, float]:
    """``{case: mean over the seeds that scored it}`` (NaN values left out; NaN where none)."""
    out: dict[str, float] = {}
    for case in sorted({k for cases in per_seed for k in cases}):
        out[case] = mean_std([cases[case] for cases in per_seed if case in cases])[0]
    return out
