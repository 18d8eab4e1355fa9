"""The labelled inputs of one evaluation task: the training hemisphere, its CV folds, the test hemisphere."""

from __future__ import annotations

from dataclasses import dataclass, field

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
        z_mm: float64 ``(T,)`` world z (mm) of every item's centre (the site's labelled voxel or
            the token cube's middle): what the cross-validation folds are cut along.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    tokens: torch.Tensor | None = None
    z_mm: torch.Tensor | None = None

    def class_counts(self) -> list[int]:
        """Labels per lobe, in :data:`LOBES` order."""
        return torch.bincount(self.labels, minlength=NUM_CLASSES).tolist()


@dataclass
class TaskData:
    """One task: its splits, its cross-validation folds and a JSON-ready description.

    Attributes:
        name: ``patch`` or ``dense``.
        splits: split name (:data:`SPLITS`) -> :class:`TaskSplit`.
        info: what the task is (geometry, counts, folds), copied into evidence.json.
        folds: int64 index tensors into the training items, one per fold (see
            :func:`~dinov2.eval.evidence.folds.z_slab_folds`); never an index of the test split.
    """

    name: str
    splits: dict[str, TaskSplit]
    info: dict = field(default_factory=dict)
    folds: list[torch.Tensor] = field(default_factory=list)
