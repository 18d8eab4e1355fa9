"""Cross-validation folds of the training hemisphere: contiguous slabs along world z.

Neighbouring examples share voxels (patch cubes overlap their neighbours at a 4-voxel stride)
or context (tokens of one window attend to each other), and the same site is cut from both
templates. A random K-fold split would score the probe on near-copies of what it was fitted on
and favour weak penalties. Items are therefore grouped by the z row of their centre (every item
on one row, e.g. one site in both templates, goes together), and the rows, bottom to top, are
cut into K runs holding about the same number of items: fold ``f`` is the ``f``-th slab from the
bottom, so only the K-1 cuts separate neighbours.
"""

from __future__ import annotations

import torch

from .errors import EvidenceError
from .tasks import NUM_CLASSES, TaskData

DEFAULT_FOLDS = 4


def _slab_starts(counts: torch.Tensor, folds: int) -> list[int]:
    """First row of every slab after the bottom one.

    Args:
        counts: int ``(R,)`` items per z row, bottom row first.
        folds: ``K``, at most ``R``.

    Returns:
        ``K - 1`` increasing row indices in ``[1, R)``.
    """
    below = torch.cumsum(counts, 0).tolist()  # below[r]: items on rows 0..r
    total, rows, starts = below[-1], len(below), []
    for f in range(1, folds):
        # Every slab keeps at least one row, and leaves one for each slab above it.
        candidates = range((starts[-1] if starts else 0) + 1, rows - (folds - f) + 1)
        starts.append(min(candidates, key=lambda r: (abs(below[r - 1] - f * total / folds), r)))
    return starts


def z_slab_folds(z_mm: torch.Tensor, folds: int = DEFAULT_FOLDS) -> list[torch.Tensor]:
    """Split items into ``folds`` contiguous z slabs of about equal size.

    Args:
        z_mm: float ``(T,)`` world z (mm) of every training item's centre; items on one row
            must hold the same value (they do: one formula of the row index).
        folds: ``K``.

    Returns:
        ``K`` sorted int64 index tensors into the ``T`` items, bottom slab first: disjoint,
        together all items, and every item of fold ``f`` below every item of fold ``f + 1``.

    Raises:
        EvidenceError: ``folds < 2`` or fewer distinct z rows than folds.
    """
    rows, row_of_item, counts = torch.unique(z_mm, sorted=True, return_inverse=True, return_counts=True)
    if folds < 2 or rows.numel() < folds:
        raise EvidenceError(f"--cv-folds {folds}: cross-validation needs at least 2 folds and at most one per z "
                            f"row of the training hemisphere ({rows.numel()} rows); pass e.g. --cv-folds "
                            f"{max(2, min(DEFAULT_FOLDS, rows.numel()))}.")
    starts = torch.tensor(_slab_starts(counts, folds))
    fold_of_item = torch.bucketize(torch.arange(rows.numel()), starts, right=True)[row_of_item]
    return [torch.nonzero(fold_of_item == f).flatten() for f in range(folds)]


def describe_folds(folds: list[torch.Tensor], z_mm: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """JSON-ready ``{"z_mm": [lowest, highest item centre], "examples", "class_counts"}`` per fold."""
    return [{"z_mm": [float(z_mm[idx].min()), float(z_mm[idx].max())], "examples": int(idx.numel()),
             "class_counts": torch.bincount(labels[idx], minlength=NUM_CLASSES).tolist()} for idx in folds]


def attach_folds(task: TaskData, folds: int = DEFAULT_FOLDS) -> TaskData:
    """Set ``task.folds`` from its training items' z and describe them in ``task.info["cv"]``."""
    training = task.splits["training"]
    task.folds = z_slab_folds(training.z_mm, folds)
    task.info["cv"] = {"folds": folds, "grouping": "contiguous slabs of world z (item centres), bottom first",
                       "slabs": describe_folds(task.folds, training.z_mm, training.labels)}
    return task
