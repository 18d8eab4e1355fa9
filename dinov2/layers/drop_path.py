"""Stochastic depth: drop a residual branch for whole samples.

Two ways to do it, equal in expectation:

* :func:`drop_path_scale`: compute the branch for every sample and multiply it by 0 (dropped)
  or ``1 / keep`` (kept), each sample drawn independently;
* :func:`kept_subset`: draw a fixed number of samples to keep, run the branch on those only and
  add it back scaled by ``batch / kept``. The branch's compute shrinks with the rate, which is
  why training blocks use it whenever it drops at least one sample (at rate 0.3 a block does
  ~30 % less work). Drawn from torch's global generator, like the Bernoulli factors, so a run
  that restores the RNG state on resume replays the same choices.
"""

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


def kept_subset(batch: int, drop_prob: float, training: bool, device: torch.device) -> tuple[torch.Tensor, float] | None:
    """Samples whose residual branch is computed, and the factor that keeps the expectation.

    Keeps ``max(1, round(batch * (1 - drop_prob)))`` samples, chosen uniformly without
    replacement; each sample is kept with probability ``kept / batch`` and its branch scaled by
    ``batch / kept``, so ``E[output] = x + branch(x)`` as with :func:`drop_path_scale`. Rounding
    (not the floor) keeps the share of dropped samples nearest the configured rate: at rate
    0.1 and 32 samples, 3 are dropped (9.4 %), where the floor would drop 4 (12.5 %).

    Args:
        batch: samples ``B``; drop_prob: the rate; training: inactive in eval mode.
        device: where the indices go.

    Returns:
        ``(indices (kept,), scale)``, or None when inactive or when it would drop no sample
        (small batches: use :func:`drop_path_scale` then, so stochastic depth still acts).
    """
    if drop_prob <= 0.0 or not training:
        return None
    kept = max(1, round(batch * (1.0 - drop_prob)))
    if kept >= batch:
        return None
    return torch.randperm(batch, device=device)[:kept], batch / kept


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
