"""The labelled inputs of one evaluation task: the training hemisphere, its CV folds, the test hemisphere."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from dinov2.sample_data.classification import LOBES

SPLITS = ("training", "test")
NUM_CLASSES = len(LOBES)


@dataclass
class TaskSplit:
    """Inputs and labels of one split.

    Attributes:
        inputs: float32 ``(N, 1, S, S, S)``: patches (patch task) or windows (dense task), in
            ``[-1, 1]``, axes ``(H, W, D)`` = atlas ``(x, y, z)`` (x mirrored for the left hemisphere).
        labels: int64 ``(T,)`` lobe index of every labelled item.
        tokens: int64 ``(T, 2)`` ``(window index, token index)`` of every label in the dense task
            (token index in the backbone's order: ``(h, w, d)`` flattened with ``d`` fastest);
            None in the patch task, where ``T == N`` and item ``i`` is input ``i``.
        centre_mm: float64 ``(T, 3)`` world ``(x, y, z)`` (mm) of every item's centre (the site's
            labelled voxel or the token cube's middle): what the cross-validation folds group by.
        input_box: int64 ``(T, 2, 3)`` atlas voxels ``[lo, hi)`` along ``(x, y, z)`` of the real
            voxels the item's input shows (its cube, or its token's whole window, clipped to its
            hemisphere and the grid): what the cross-validation buffer compares.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    tokens: torch.Tensor | None = None
    centre_mm: torch.Tensor | None = None
    input_box: torch.Tensor | None = None

    @property
    def z_mm(self) -> torch.Tensor | None:
        """float64 ``(T,)`` world z (mm) of every item's centre (what the z-slab folds are cut along)."""
        return None if self.centre_mm is None else self.centre_mm[:, 2]

    def class_counts(self) -> list[int]:
        """Labels per lobe, in :data:`LOBES` order."""
        return torch.bincount(self.labels, minlength=NUM_CLASSES).tolist()


def world_mm(affine: np.ndarray, voxels: np.ndarray) -> torch.Tensor:
    """float64 ``(T, 3)`` world (mm) of ``(T, 3)`` (possibly fractional) voxel coordinates of an axis-aligned grid."""
    scale, offset = np.diag(affine)[:3].astype(np.float64), affine[:3, 3].astype(np.float64)
    return torch.from_numpy(scale * np.asarray(voxels, dtype=np.float64) + offset)


@dataclass
class TaskData:
    """One task: its splits, its cross-validation folds and a JSON-ready description.

    Attributes:
        name: ``patch`` or ``dense``.
        splits: split name (:data:`SPLITS`) -> :class:`TaskSplit`.
        info: what the task is (geometry, counts, folds), copied into evidence.json.
        folds: int64 index tensors into the training items, one per fold: the items each fold
            holds out (see :mod:`~dinov2.eval.evidence.folds`); never an index of the test split.
        fitted_on: int64 index tensors into the training items, one per fold: what the probe is
            fitted on while that fold is held out (the other folds less the buffer); empty = all
            the other folds.
    """

    name: str
    splits: dict[str, TaskSplit]
    info: dict = field(default_factory=dict)
    folds: list[torch.Tensor] = field(default_factory=list)
    fitted_on: list[torch.Tensor] = field(default_factory=list)
