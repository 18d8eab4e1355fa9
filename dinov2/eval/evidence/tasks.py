"""The labelled inputs of one evaluation task, split into training, validation and test."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dinov2.data.classification_sample import LOBES

SPLITS = ("training", "validation", "test")
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
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    tokens: torch.Tensor | None = None

    def class_counts(self) -> list[int]:
        """Labels per lobe, in :data:`LOBES` order."""
        return torch.bincount(self.labels, minlength=NUM_CLASSES).tolist()


@dataclass
class TaskData:
    """One task: its splits and a JSON-ready description.

    Attributes:
        name: ``patch`` or ``dense``.
        splits: split name -> :class:`TaskSplit`.
        info: what the task is (geometry, counts), copied into evidence.json.
    """

    name: str
    splits: dict[str, TaskSplit]
    info: dict = field(default_factory=dict)
