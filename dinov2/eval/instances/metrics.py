"""Instance segmentation measures: the Cell Tracking Challenge's SEG, DET and OP_CSB, object-level
precision / recall / F1 at IoU >= 0.5, and the count error.

Implemented from the published definitions (Matula et al., PLoS ONE 10(12):e0144959, 2015, for
AOGM; Ulman et al., Nature Methods 14:1141, 2017, and the challenge's evaluation methodology for
SEG, DET and OP_CSB), in 3D, on whole instance label volumes. ``R`` is a reference object, ``S`` a
predicted (computed) one, ``|.|`` a voxel count.

The matching rule (the same for SEG and DET, as in the challenge): **R and S match when
|R ∩ S| > 0.5 · |R|**, i.e. S covers more than half of R. Each R therefore matches at most one S;
one S may match several R (it merged them).

* **SEG** = mean over the reference objects of ``J(R) = |R ∩ S| / |R ∪ S|`` for the S matching R,
  and 0 for an R that no S matches. Predicted objects matching nothing do not lower SEG.
* **DET** = ``1 - min(AOGM-D, AOGM-D0) / AOGM-D0`` with
  ``AOGM-D = 5·NS + 10·FN + 1·FP`` (the detection weights of the challenge) and
  ``AOGM-D0 = 10 · n_ref`` (the cost of adding every reference object to an empty result), where
  ``NS`` = the number of split operations: each S matched by ``m > 1`` references must be split
  ``m - 1`` times; ``FN`` = the references no S matches; ``FP`` = the S that match no reference.
  An object split in two halves of which one covers more than half of R costs 1 (an FP); halves
  of which neither does cost 10 + 2 (R missed, both halves spurious). The challenge's DET
  compares detection markers; here the reference masks themselves are the markers.
* **OP_CSB** = ``(SEG + DET) / 2``.
* **precision / recall / F1**: a one-to-one matching of pairs with ``IoU(R, S) >= 0.5``. With
  IoU > 0.5 a pair is unique on both sides; IoU = 0.5 exactly can tie (R cut into two equal
  halves), so pairs are taken greedily by decreasing IoU (then by id), each object at most once.
  ``TP`` = matched pairs, ``precision = TP / n_pred``, ``recall = TP / n_ref``,
  ``F1 = 2·TP / (n_pred + n_ref)``.
* **count_error** = ``n_pred - n_ref``.

Undefined values are NaN: SEG, DET, OP_CSB and recall without reference objects, precision
without predicted ones, F1 without either.

All overlaps come from one contingency table (:func:`contingency`): one :func:`numpy.bincount`
over the paired (reference, prediction) indices of all voxels. It is dense, ``(n_ref + 1) x
(n_pred + 1)`` int64, fine for thousands of objects per volume.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DET_WEIGHTS = {"split": 5.0, "fn": 10.0, "fp": 1.0}


@dataclass(frozen=True)
class Contingency:
    """Voxel overlaps of the objects of two label volumes (background left out).

    ``overlap[i, j]`` = ``|R_i ∩ S_j|``, ``(n_ref, n_pred)`` int64; ``ref_sizes`` ``(n_ref,)`` and
    ``pred_sizes`` ``(n_pred,)`` are the objects' voxel counts; ``ref_ids`` / ``pred_ids`` their
    label values, in the order of the rows / columns.
    """

    overlap: np.ndarray
    ref_sizes: np.ndarray
    pred_sizes: np.ndarray
    ref_ids: np.ndarray
    pred_ids: np.ndarray


@dataclass(frozen=True)
class InstanceScores:
    """Every measure of one (reference, prediction) pair; see the module docstring."""

    seg: float
    det: float
    op_csb: float
    precision: float
    recall: float
    f1: float
    n_ref: int
    n_pred: int
    tp: int
    splits: int
    det_fn: int
    det_fp: int
    count_error: int

    def as_dict(self) -> dict:
        """The scores as a plain dict (for JSON and tables)."""
        return asdict(self)


def _ratio(num: float, den: float) -> float:
    """``num / den``, NaN when ``den`` is 0."""
    return float(num) / float(den) if den else float("nan")


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map label values to 0..n with the background at 0: ``(index per voxel, ids of 1..n)``."""
    flat = labels.ravel().astype(np.int64, copy=False)  # bincount refuses unsigned 64-bit input
    if flat.size and flat.min() < 0:
        raise ValueError("instance labels must be >= 0 (0 is the background)")
    top = int(flat.max()) if flat.size else 0
    if top <= flat.size:  # a lookup table no larger than the volume: no sort needed
        ids = np.flatnonzero(np.bincount(flat, minlength=1)[1:]) + 1
        lookup = np.zeros(top + 1, dtype=np.int64)
        lookup[ids] = np.arange(1, ids.size + 1)
        return lookup[flat], ids
    ids, inverse = np.unique(flat, return_inverse=True)
    if ids[0] == 0:
        return inverse.astype(np.int64), ids[1:]
    return inverse.astype(np.int64) + 1, ids


def contingency(reference: np.ndarray, predicted: np.ndarray) -> Contingency:
    """The overlap table of two ``(X, Y, Z)`` integer label volumes (0 = background, any ids)."""
    reference, predicted = np.asarray(reference), np.asarray(predicted)
    if reference.shape != predicted.shape:
        raise ValueError(f"shapes differ: reference {reference.shape}, prediction {predicted.shape}")
    for name, array in (("reference", reference), ("prediction", predicted)):
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} labels must be integers, got dtype {array.dtype}")
    ref_index, ref_ids = _compact(reference)
    pred_index, pred_ids = _compact(predicted)
    n_cols = pred_ids.size + 1
    table = np.bincount(ref_index * n_cols + pred_index, minlength=(ref_ids.size + 1) * n_cols)
    table = table.reshape(ref_ids.size + 1, n_cols)
    return Contingency(table[1:, 1:], table[1:].sum(1), table[:, 1:].sum(0), ref_ids, pred_ids)


def match_matrix(c: Contingency) -> np.ndarray:
    """``(n_ref, n_pred)`` bool: S_j covers more than half of R_i (at most one True per row)."""
    return c.overlap > 0.5 * c.ref_sizes[:, None]


def iou_matrix(c: Contingency) -> np.ndarray:
    """``(n_ref, n_pred)`` float64 Jaccard index of every pair of objects."""
    union = c.ref_sizes[:, None] + c.pred_sizes[None, :] - c.overlap
    return c.overlap / np.maximum(union, 1)


def seg_score(c: Contingency) -> float:
    """SEG: mean Jaccard index of each reference object with its match (0 unmatched)."""
    jaccard = np.where(match_matrix(c), iou_matrix(c), 0.0).sum(1)
    return _ratio(jaccard.sum(), c.ref_sizes.size)


def det_errors(c: Contingency) -> tuple[int, int, int]:
    """``(splits, fn, fp)`` of AOGM-D: split operations, missed references, spurious predictions."""
    match = match_matrix(c)
    per_pred = match.sum(0)
    splits = int(np.maximum(per_pred - 1, 0).sum())
    fn = int((~match.any(1)).sum())
    fp = int((per_pred == 0).sum())
    return splits, fn, fp


def det_score(splits: int, fn: int, fp: int, n_ref: int) -> float:
    """DET = 1 - min(AOGM-D, AOGM-D0) / AOGM-D0 (NaN without reference objects)."""
    aogm = DET_WEIGHTS["split"] * splits + DET_WEIGHTS["fn"] * fn + DET_WEIGHTS["fp"] * fp
    aogm0 = DET_WEIGHTS["fn"] * n_ref
    return 1.0 - min(aogm, aogm0) / aogm0 if n_ref else float("nan")


def iou_matches(c: Contingency, min_iou: float = 0.5) -> list[tuple[int, int, float]]:
    """One-to-one ``(ref row, pred column, IoU)`` pairs with IoU >= ``min_iou``, greedy by IoU."""
    iou = iou_matrix(c)
    rows, cols = np.nonzero((iou >= min_iou) & (c.overlap > 0))
    order = np.lexsort((cols, rows, -iou[rows, cols]))  # IoU descending, then ids
    used_rows, used_cols, pairs = set(), set(), []
    for r, s in zip(rows[order].tolist(), cols[order].tolist()):
        if r not in used_rows and s not in used_cols:
            used_rows.add(r)
            used_cols.add(s)
            pairs.append((r, s, float(iou[r, s])))
    return pairs


def instance_scores(reference: np.ndarray, predicted: np.ndarray) -> InstanceScores:
    """All measures of a predicted ``(X, Y, Z)`` label volume against its reference.

    Args:
        reference: ``(X, Y, Z)`` integer instance labels, 0 = background, any ids.
        predicted: ``(X, Y, Z)`` integer instance labels of the same shape.

    Returns:
        :class:`InstanceScores` (definitions and matching rules in the module docstring).
    """
    c = contingency(reference, predicted)
    n_ref, n_pred = c.ref_sizes.size, c.pred_sizes.size
    seg = seg_score(c)
    splits, fn, fp = det_errors(c)
    det = det_score(splits, fn, fp, n_ref)
    tp = len(iou_matches(c))
    return InstanceScores(
        seg=seg,
        det=det,
        op_csb=(seg + det) / 2.0,
        precision=_ratio(tp, n_pred),
        recall=_ratio(tp, n_ref),
        f1=_ratio(2 * tp, n_pred + n_ref),
        n_ref=int(n_ref),
        n_pred=int(n_pred),
        tp=tp,
        splits=splits,
        det_fn=fn,
        det_fp=fp,
        count_error=int(n_pred - n_ref),
    )
