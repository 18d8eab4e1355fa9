"""UNETR decoder on four transformer taps, assembled from MONAI's UNETR blocks.

The layout follows the UNETR paper (Hatamizadeh et al., 2022): the raw image feeds a
full-resolution convolutional block; the shallower taps are upsampled by transposed convolutions
(``UnetrPrUpBlock``) to successively finer resolutions and used as skips; the deepest tap is the
bottom of a chain of ``UnetrUpBlock`` decoders. For a patch of ``2**L`` voxels the decoder has
``L`` stages; with the canonical patch 16 (``L = 4``) the three shallow taps land at 1/8, 1/4 and
1/2 resolution exactly as in MONAI's ``UNETR``. With a smaller patch, taps that would fall on the
same resolution are summed after their projection, so all four taps are always used.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from .taps import NUM_TAPS


def patch_levels(patch_size: int) -> int:
    """``L`` with ``patch_size == 2**L`` (L >= 1); the number of decoder stages."""
    levels = int(round(math.log2(patch_size))) if patch_size > 0 else 0
    if patch_size < 2 or 2 ** levels != patch_size:
        raise ValueError(f"UNETR-style decoders need a power-of-two patch size >= 2, got {patch_size}")
    return levels


def skip_levels(levels: int, num_skips: int = NUM_TAPS - 1) -> list[int]:
    """Resolution level (1 = 1/2, 2 = 1/4, ...) of each shallow tap, shallowest first.

    The deepest skip sits one level above the bottom (``levels - 1``), the others one level
    finer each, clamped at level 1 (taps that share a level are summed).
    """
    if levels < 2:
        return [1] * num_skips if levels >= 1 else []
    return [max(1, levels - num_skips + j) for j in range(num_skips)]


class UNETRHead(nn.Module):
    """UNETR decoder: image block + 3 projected skip taps + bottom tap → per-voxel logits.

    Args:
        embed_dim: channels ``E`` of the backbone features.
        patch_size: backbone patch side (power of two).
        in_channels: channels of the raw image fed to the full-resolution block.
        out_channels: number of output classes / label channels.
        feature_size: width of the finest decoder level (doubles per level), 16 in UNETR.
        norm_name: MONAI norm name of the convolutional blocks (``"instance"``, ``"batch"``...).
        res_block: residual convolution blocks (UNETR default True).
        conv_block: extra convolutions in the skip projections (UNETR default True).

    Example:
        >>> head = UNETRHead(embed_dim=64, patch_size=16, in_channels=1, out_channels=3)
        >>> feats = [torch.randn(2, 64, 2, 2, 2) for _ in range(4)]
        >>> head(torch.randn(2, 1, 32, 32, 32), feats).shape
        torch.Size([2, 3, 32, 32, 32])
    """

    def __init__(self, embed_dim: int, patch_size: int, in_channels: int, out_channels: int,
                 feature_size: int = 16, norm_name: str | tuple = "instance", res_block: bool = True,
                 conv_block: bool = True):
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("in_channels", in_channels),
                            ("out_channels", out_channels), ("feature_size", feature_size)):
            if value < 1:
                raise ValueError(f"UNETRHead: {name} must be >= 1, got {value}")
        self.levels = patch_levels(patch_size)
        self.patch_size = patch_size
        self.skip_level_of_tap = skip_levels(self.levels)
        width = [feature_size * 2 ** level for level in range(self.levels)]

        self.image_block = UnetrBasicBlock(3, in_channels, width[0], kernel_size=3, stride=1,
                                           norm_name=norm_name, res_block=res_block)
        # One transposed-conv projection per shallow tap: level s is reached by (L - s) upsamplings.
        self.skip_proj = nn.ModuleList([
            UnetrPrUpBlock(3, embed_dim, width[s], num_layer=self.levels - s - 1, kernel_size=3, stride=1,
                           upsample_kernel_size=2, norm_name=norm_name, conv_block=conv_block,
                           res_block=res_block)
            for s in self.skip_level_of_tap
        ])
        # Decoder level s takes the coarser map (bottom = raw deepest tap), upsamples x2, fuses the skip.
        self.decoders = nn.ModuleList([
            UnetrUpBlock(3, embed_dim if s == self.levels - 1 else width[s + 1], width[s], kernel_size=3,
                         upsample_kernel_size=2, norm_name=norm_name, res_block=res_block)
            for s in reversed(range(self.levels))
        ])
        self.out = UnetOutBlock(3, width[0], out_channels)

    def forward(self, image: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decode.

        Args:
            image: ``(B, C_in, H, W, D)``, every side a multiple of the patch size.
            features: 4 tensors ``(B, E, H/p, W/p, D/p)``, shallowest tap first.

        Returns:
            logits ``(B, out_channels, H, W, D)``.
        """
        if len(features) != NUM_TAPS:
            raise ValueError(f"UNETRHead expects {NUM_TAPS} feature maps, got {len(features)}")
        skips: dict[int, torch.Tensor] = {0: self.image_block(image)}
        for level, proj, feat in zip(self.skip_level_of_tap, self.skip_proj, features[:-1]):
            projected = proj(feat)
            skips[level] = skips[level] + projected if level in skips else projected
        x = features[-1]
        for level, decoder in zip(reversed(range(self.levels)), self.decoders):
            x = decoder(x, skips[level])
        return self.out(x)
