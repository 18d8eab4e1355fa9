"""Linear segmentation probe: concatenated tokens of the last 4 blocks, BatchNorm, 1×1×1 conv."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .taps import NUM_TAPS


class LinearHead(nn.Module):
    """Per-token linear classifier upsampled trilinearly to the input size.

    The only learned map is a 1×1×1 convolution (after BatchNorm of the concatenated tokens), so
    the result measures how linearly separable the frozen features are.

    Args:
        embed_dim: channels ``E`` of each tap.
        out_channels: number of classes / label channels.
        num_taps: number of concatenated taps (4).

    Example:
        >>> head = LinearHead(embed_dim=64, out_channels=3)
        >>> head(torch.randn(2, 1, 32, 32, 32), [torch.randn(2, 64, 4, 4, 4)] * 4).shape
        torch.Size([2, 3, 32, 32, 32])
    """

    def __init__(self, embed_dim: int, out_channels: int, num_taps: int = NUM_TAPS):
        super().__init__()
        if embed_dim < 1 or out_channels < 1 or num_taps < 1:
            raise ValueError(f"LinearHead: embed_dim ({embed_dim}), out_channels ({out_channels}) and "
                             f"num_taps ({num_taps}) must be >= 1")
        self.num_taps = num_taps
        self.norm = nn.BatchNorm3d(embed_dim * num_taps)
        self.classifier = nn.Conv3d(embed_dim * num_taps, out_channels, kernel_size=1)

    def forward(self, image: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Classify every token, then upsample.

        Args:
            image: ``(B, C, H, W, D)`` (only its spatial size is used).
            features: ``num_taps`` tensors ``(B, E, h, w, d)``.

        Returns:
            logits ``(B, out_channels, H, W, D)``.
        """
        if len(features) != self.num_taps:
            raise ValueError(f"LinearHead expects {self.num_taps} feature maps, got {len(features)}")
        logits = self.classifier(self.norm(torch.cat(list(features), dim=1)))
        return F.interpolate(logits, size=image.shape[2:], mode="trilinear", align_corners=False)
