"""Fidelity-aware projection module (FAPM) of the Dino U-Net head, in 3D.

Each scale's fused feature map (``E`` channels, wide and redundant) is brought to a small common
rank ``r`` by two 1×1×1 projections: a *basis* shared by all scales (one module, owned by the
head, applied to every scale) and a scale-specific one. The shared branch modulates the specific
one FiLM-style (``y * (1 + γ) + β``, ``γ, β`` computed per scale from the shared projection and
zero-initialised, so training starts from the plain specific projection). A refinement
(1×1×1 → norm/act → depthwise-separable 3×3×3 → norm/act → 1×1×1 → squeeze-excitation) is added
back with a residual shortcut.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import group_norm


class SqueezeExcitation(nn.Module):
    """Channel gates from the global average: ``(B, C, *S)`` → ``(B, C, *S)``.

    Args:
        channels: ``C``.
        reduction: hidden width ``C / reduction`` (at least 1).
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.squeeze = nn.Conv3d(channels, hidden, 1)
        self.excite = nn.Conv3d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale each channel of ``x`` by a gate in (0, 1)."""
        gates = torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean(dim=(2, 3, 4), keepdim=True)))))
        return x * gates


class FidelityAwareProjection(nn.Module):
    """One scale's FAPM: ``(B, E, *S)`` + shared basis ``(B, r, *S)`` → ``(B, r, *S)``.

    Args:
        in_channels: ``E``.
        rank: ``r``, the common width of every scale.

    Example:
        >>> basis = nn.Conv3d(32, 8, 1)
        >>> fapm = FidelityAwareProjection(32, 8)
        >>> x = torch.randn(2, 32, 4, 4, 4)
        >>> fapm(x, basis(x)).shape
        torch.Size([2, 8, 4, 4, 4])
    """

    def __init__(self, in_channels: int, rank: int):
        super().__init__()
        if min(in_channels, rank) < 1:
            raise ValueError(f"FidelityAwareProjection: in_channels ({in_channels}) and rank ({rank}) must be >= 1")
        self.specific = nn.Conv3d(in_channels, rank, 1)
        self.film = nn.Conv3d(rank, 2 * rank, 1)
        nn.init.zeros_(self.film.weight)  # γ = β = 0: start as the plain scale-specific projection
        nn.init.zeros_(self.film.bias)
        self.refine = nn.Sequential(
            nn.Conv3d(rank, rank, 1), group_norm(rank), nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(rank, rank, 3, padding=1, groups=rank),  # depthwise ...
            nn.Conv3d(rank, rank, 1),  # ... separable: pointwise
            group_norm(rank), nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(rank, rank, 1),
            SqueezeExcitation(rank),
        )

    def forward(self, x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """Project and refine.

        Args:
            x: ``(B, E, *S)`` the scale's fused features.
            basis: ``(B, r, *S)`` the shared basis projection of ``x``.

        Returns:
            ``(B, r, *S)``.
        """
        gamma, beta = self.film(basis).chunk(2, dim=1)
        y = self.specific(x) * (1 + gamma) + beta
        return y + self.refine(y)
