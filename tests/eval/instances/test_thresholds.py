"""The grid search of the watershed thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from dinov2.eval.instances.targets import distance_target
from dinov2.eval.instances.thresholds import TABLE_COLUMNS, search_thresholds


def test_best_pair_and_table(touching_cubes):
    pairs = [(distance_target(touching_cubes), touching_cubes)]
    result = search_thresholds(pairs, cells_max=(0.2, 0.5), cell_fill=(0.1, 0.2, 0.5))
    # valid pairs (cell_fill < cells_max), in grid order: (0.2, 0.1), (0.5, 0.1), (0.5, 0.2).
    # cells_max 0.2 < 1/3 (the target's lowest object value): one marker over both cubes ->
    # merged pair: SEG 0.5, DET 0.75, OP_CSB 0.625. cells_max 0.5 splits them exactly -> 1; the
    # first of the two ties wins
    assert [(row["cells_max"], row["cell_fill"]) for row in result.table] == [(0.2, 0.1), (0.5, 0.1), (0.5, 0.2)]
    assert all(tuple(row) == TABLE_COLUMNS for row in result.table)
    assert [row["op_csb"] for row in result.table] == pytest.approx([0.625, 1.0, 1.0])
    assert (result.cells_max, result.cell_fill, result.op_csb) == (0.5, 0.1, 1.0)


def test_volume_without_reference_is_left_out(touching_cubes):
    empty = np.zeros_like(touching_cubes)
    pairs = [(distance_target(touching_cubes), touching_cubes), (empty.astype(np.float32), empty)]
    assert search_thresholds(pairs, cells_max=(0.5,), cell_fill=(0.1,)).op_csb == pytest.approx(1.0)


def test_rejects_empty_grid_and_pairs(touching_cubes):
    pairs = [(distance_target(touching_cubes), touching_cubes)]
    with pytest.raises(ValueError, match="cell_fill < cells_max"):
        search_thresholds(pairs, cells_max=(0.3,), cell_fill=(0.3, 0.5))
    with pytest.raises(ValueError, match="at least one"):
        search_thresholds([])
