"""Raw-intensity baseline: the input region's intensities average-pooled to ``g^3`` values.

What a linear probe can read from the intensities alone, without any network: for the patch
task the whole ``N^3`` input cube (the very input the network gets), for the dense task the
token's own cube, average-pooled to a ``g x g x g`` grid; ``g`` is one of :data:`POOLING_GRIDS`,
chosen by the same cross-validation as the probe's penalty (the best CV score over grids and
penalties; ties: the coarser grid).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .dense_task import to_token_cubes
from .tasks import TaskSplit

POOLING_GRIDS = (1, 2, 4)


def pooled_intensities(cubes: torch.Tensor, grid: int) -> torch.Tensor:
    """``(N, 1, S, S, S)`` cubes -> ``(N, grid^3)`` means over ``grid^3`` sub-cubes."""
    return F.adaptive_avg_pool3d(cubes.float(), grid).flatten(1)


def token_cubes(windows: torch.Tensor, tokens: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """The voxels of every labelled token.

    Args:
        windows: ``(M, 1, W, W, W)``.
        tokens: ``(T, 2)`` ``(window index, token index)``.
        patch: token cube ``(ph, pw, pd)``.

    Returns:
        ``(T, 1, ph, pw, pd)``.
    """
    cubes = to_token_cubes(windows[:, 0], patch)  # (M, n_tokens, ph*pw*pd)
    return cubes[tokens[:, 0], tokens[:, 1]].reshape(-1, 1, *patch)


def raw_features(split: TaskSplit, grid: int, patch: Sequence[int]) -> torch.Tensor:
    """Raw-intensity features of every labelled item of a split: ``(T, grid^3)``.

    Args:
        split: patch-task split (items are the input cubes) or dense-task split (items are tokens).
        grid: pooling grid side ``g``.
        patch: the backbone's token cube (used by the dense task only).
    """
    cubes = split.inputs if split.tokens is None else token_cubes(split.inputs, split.tokens, patch)
    return pooled_intensities(cubes, grid)
