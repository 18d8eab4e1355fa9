"""Feed-forward layers of a transformer block: GELU MLP and SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    """Linear → exact GELU → Linear (parameter names ``fc1``/``fc2`` as in ViT checkpoints).

    Shapes: ``(..., in_features)`` → ``(..., out_features)``.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 bias: bool = True, drop: float = 0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()  # exact (erf) GELU: the published weights were trained with it
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward: ``w3(silu(x W1) * (x W2))`` with W1, W2 fused into ``w12``.

    ``hidden_features`` is the nominal 4×dim width; the SwiGLU width is 2/3 of it rounded up
    to a multiple of 8 so the parameter count matches a GELU MLP of the nominal width.

    Shapes: ``(..., in_features)`` → ``(..., out_features)``.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 bias: bool = True, drop: float = 0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        hidden = (int(hidden_features * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(in_features, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, out_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.drop(self.w3(self.drop(F.silu(x1) * x2)))
