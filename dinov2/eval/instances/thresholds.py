"""Grid search of the two watershed thresholds ``(cells_max, cell_fill)`` maximising OP_CSB."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .metrics import instance_scores
from .postprocess import instances_from_distance

DEFAULT_CELLS_MAX = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_CELL_FILL = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
# the columns of a row of the grid table: the thresholds and the means over the pairs
TABLE_COLUMNS = ("cells_max", "cell_fill", "op_csb", "seg", "det", "f1")


@dataclass(frozen=True)
class ThresholdSearch:
    """The best thresholds, their mean OP_CSB, and every grid point as a row of
    :data:`TABLE_COLUMNS` (in grid order: ``cells_max`` outer, ``cell_fill`` inner)."""

    cells_max: float
    cell_fill: float
    op_csb: float
    table: list[dict] = field(repr=False)


def _grid(cells_max: Iterable[float], cell_fill: Iterable[float]) -> list[tuple[float, float]]:
    """The valid pairs (``cell_fill < cells_max``) in grid order; ValueError when none is."""
    fills = [float(f) for f in cell_fill]
    pairs = [(float(m), f) for m in cells_max for f in fills if f < float(m)]
    if not pairs:
        raise ValueError("no threshold pair with cell_fill < cells_max in the grid")
    return pairs


def _row(cells_max: float, cell_fill: float, pairs: Sequence, **size) -> dict:
    """One grid point: the means (NaN-means) of the measures over all ``(dist, labels)`` pairs."""
    scores = [
        instance_scores(reference, instances_from_distance(dist, cells_max, cell_fill, **size))
        for dist, reference in pairs
    ]
    row = {"cells_max": cells_max, "cell_fill": cell_fill}
    for key in TABLE_COLUMNS[2:]:
        values = np.array([getattr(s, key) for s in scores], dtype=np.float64)
        # a volume without reference objects has NaN scores: it is left out, not counted as 0
        row[key] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return row


def search_thresholds(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    cells_max: Iterable[float] = DEFAULT_CELLS_MAX,
    cell_fill: Iterable[float] = DEFAULT_CELL_FILL,
    **size,
) -> ThresholdSearch:
    """Try every ``(cells_max, cell_fill)`` with ``cell_fill < cells_max`` and keep the best.

    Args:
        pairs: ``(dist_pred, reference_labels)`` per volume: ``(X, Y, Z)`` float predicted
            distance map and ``(X, Y, Z)`` integer reference instance labels (shapes may differ
            between volumes).
        cells_max, cell_fill: the values tried for each threshold.
        **size: ``min_voxels`` / ``min_ml`` / ``spacing``, passed to
            :func:`.postprocess.instances_from_distance` for every volume.

    Returns:
        :class:`ThresholdSearch`: the pair with the highest mean OP_CSB (the first in grid order
        on a tie; NaN rows never win) and the whole grid as a table.
    """
    if not pairs:
        raise ValueError("the threshold search needs at least one (distance, labels) pair")
    table = [_row(m, f, pairs, **size) for m, f in _grid(cells_max, cell_fill)]
    scores = np.array([row["op_csb"] for row in table])
    if np.isnan(scores).all():
        raise ValueError("no volume has reference objects: OP_CSB is undefined")
    best = table[int(np.nanargmax(scores))]  # nanargmax returns the first maximum
    return ThresholdSearch(best["cells_max"], best["cell_fill"], best["op_csb"], table)
