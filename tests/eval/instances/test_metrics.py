"""SEG, DET, OP_CSB, F1 and the count error on hand-built label volumes.

The volumes are ``(16, 6, 6)``: reference cube A = x 1..4, B = x 5..8 (4^3 = 64 voxels each,
touching), free space at x >= 10 for spurious objects. Each test's comment works the values out
by hand from the definitions in :mod:`dinov2.eval.instances.metrics`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from dinov2.eval.instances.metrics import contingency, instance_scores

A = (slice(1, 5), slice(1, 5), slice(1, 5))
B = (slice(5, 9), slice(1, 5), slice(1, 5))
C = (slice(11, 13), slice(1, 3), slice(1, 3))  # 8 voxels, away from A and B


def volume(*objects: tuple[tuple[slice, ...], int], dtype=np.int32) -> np.ndarray:
    """A ``(16, 6, 6)`` label volume with each ``(box, id)`` painted in order."""
    labels = np.zeros((16, 6, 6), dtype=dtype)
    for box, label in objects:
        labels[box] = label
    return labels


def check(scores, **expected):
    """Compare the named fields of ``scores`` with ``expected`` (NaN equals NaN)."""
    for name, value in expected.items():
        got = getattr(scores, name)
        assert (math.isnan(got) and math.isnan(value)) or got == pytest.approx(value), name


def test_perfect_prediction_with_other_ids():
    # same objects, ids 7 and 300: every J = 1, no DET error, IoU 1 -> 2 TP
    ref = volume((A, 1), (B, 2))
    check(instance_scores(ref, volume((A, 300), (B, 7))), seg=1, det=1, op_csb=1, f1=1, count_error=0)


def test_shifted_object():
    # prediction = A moved by one voxel along x: |R∩S| = 3*16 = 48 > 32 matches;
    # J = 48 / (64 + 64 - 48) = 0.6. DET: matched, no error -> 1. IoU 0.6 >= 0.5 -> F1 1
    ref = volume((A, 1))
    pred = volume(((slice(2, 6), A[1], A[2]), 1))
    check(instance_scores(ref, pred), seg=0.6, det=1, op_csb=0.8, f1=1, tp=1)


def test_split_object():
    # A cut into S1 = x 1..3 (48 voxels) and S2 = x 4 (16). SEG: S1 covers 48 > 32 -> J = 0.75.
    # DET: S2 matches nothing -> 1 FP: AOGM-D = 1, AOGM-D0 = 10 -> 0.9. OP_CSB = 0.825.
    # IoU(A, S1) = 0.75 -> TP 1, FP 1: precision 1/2, recall 1, F1 = 2/3; count error +1
    ref = volume((A, 1))
    pred = volume((A, 1), ((slice(4, 5), A[1], A[2]), 2))
    check(instance_scores(ref, pred), seg=0.75, det=0.9, op_csb=0.825, precision=0.5, recall=1,
          f1=2 / 3, det_fp=1, det_fn=0, splits=0, count_error=1)


def test_object_split_in_equal_halves():
    # halves of 32 voxels: neither covers MORE than half of A -> SEG 0; DET: A missed (10) and both
    # halves spurious (2): AOGM-D = 12, capped at AOGM-D0 = 10 -> 0. IoU of each half = 32/64
    # = 0.5 exactly: a tie, one-to-one -> 1 TP, 1 FP: precision 1/2, recall 1, F1 2/3
    ref = volume((A, 1))
    pred = volume((A, 1), ((slice(3, 5), A[1], A[2]), 2))
    check(instance_scores(ref, pred), seg=0, det=0, op_csb=0, tp=1, f1=2 / 3, det_fn=1, det_fp=2)


def test_merged_pair():
    # one prediction S = A ∪ B (128 voxels) covers all of A and of B: both match S, J = 64/128 each
    # -> SEG 0.5. DET: S matched by 2 references -> 1 split: AOGM-D = 5, AOGM-D0 = 20 -> 0.75.
    # OP_CSB 0.625. IoU(A, S) = IoU(B, S) = 0.5: one TP, FN 1 -> precision 1, recall 1/2, F1 2/3
    ref = volume((A, 1), (B, 2))
    pred = volume((A, 5), (B, 5))
    check(instance_scores(ref, pred), seg=0.5, det=0.75, op_csb=0.625, precision=1, recall=0.5,
          f1=2 / 3, splits=1, det_fn=0, det_fp=0, count_error=-1)


def test_missed_object():
    # B not predicted: SEG = (1 + 0) / 2 = 0.5; DET: 1 FN -> 1 - 10/20 = 0.5; OP_CSB 0.5.
    # TP 1 (A), FN 1 -> precision 1, recall 1/2, F1 2/3; count error -1
    ref = volume((A, 1), (B, 2))
    check(instance_scores(ref, volume((A, 1))), seg=0.5, det=0.5, op_csb=0.5, precision=1,
          recall=0.5, f1=2 / 3, det_fn=1, count_error=-1)


def test_spurious_object():
    # an extra predicted C: SEG stays 1 (C matches no reference, SEG ignores it); DET: 1 FP ->
    # 1 - 1/10 = 0.9; OP_CSB 0.95. TP 1, FP 1 -> precision 1/2, recall 1, F1 2/3; count error +1
    ref = volume((A, 1))
    check(instance_scores(ref, volume((A, 1), (C, 2))), seg=1, det=0.9, op_csb=0.95,
          precision=0.5, recall=1, f1=2 / 3, det_fp=1, count_error=1)


def test_empty_prediction_and_empty_reference():
    # nothing predicted: SEG 0, DET 1 - 20/20 = 0, F1 = 0 / 2 = 0, precision undefined
    nothing = volume()
    check(instance_scores(volume((A, 1), (B, 2)), nothing), seg=0, det=0, f1=0,
          precision=float("nan"), recall=0)
    # no reference objects: SEG / DET / recall undefined; the prediction is all false positives
    check(instance_scores(nothing, volume((C, 1))), seg=float("nan"), det=float("nan"),
          op_csb=float("nan"), precision=0, f1=0, count_error=1)
    check(instance_scores(nothing, nothing), f1=float("nan"), count_error=0)


def test_contingency_table_with_large_ids():
    # ids far above the voxel count go through the sorting path instead of a lookup table
    ref = volume((A, 1), (B, 10**12), dtype=np.int64)
    pred = volume((A, 3), ((slice(4, 9), A[1], A[2]), 2))  # pred 2 covers x 4..8: 16 of A, all B
    c = contingency(ref, pred)
    assert c.ref_ids.tolist() == [1, 10**12] and c.pred_ids.tolist() == [2, 3]
    np.testing.assert_array_equal(c.overlap, [[16, 48], [64, 0]])
    assert c.ref_sizes.tolist() == [64, 64] and c.pred_sizes.tolist() == [80, 48]


def test_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="shapes"):
        instance_scores(volume(), np.zeros((2, 2, 2), dtype=np.int32))
    with pytest.raises(ValueError, match="integers"):
        instance_scores(volume(), volume().astype(np.float32))
