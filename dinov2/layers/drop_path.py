"""Stochastic depth: drop a residual branch for whole samples."""

from __future__ import annotations

import torch
from torch import nn


def drop_path_scale(batch: int, drop_prob: float, training: bool, like: torch.Tensor) -> torch.Tensor | None:
    """Per-sample factor ``(batch,)`` that is 0 (dropped) or ``1/keep`` (kept); None when inactive.

    Returning None instead of a tensor of ones keeps the inactive path free of extra work.
    """
    if drop_prob <= 0.0 or not training:
        return None
    keep = 1.0 - drop_prob
    return torch.empty(batch, device=like.device, dtype=like.dtype).bernoulli_(keep).div_(keep)


class DropPath(nn.Module):
    """Zero the residual branch of a sample with probability ``drop_prob`` during training.

    Shapes: ``(B, ...)`` → ``(B, ...)``.
    """

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = drop_path_scale(x.shape[0], self.drop_prob, self.training, x)
        if scale is None:
            return x
        return x * scale.view(-1, *([1] * (x.ndim - 1)))
