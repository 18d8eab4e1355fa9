"""UNetFusion: the light decoder (the cheapest after Linear).

A 1×1×1 lateral projection per tap; the deepest tap starts at the patch grid (1/p) and each
shallower one is fused one resolution finer (1/(p/2), 1/(p/4), ...; never finer than
``1/finest_stride``, taps that land on the same resolution are fused there in turn): the running
map is upsampled trilinearly, the lateral map resampled to the same size, the two summed (or
concatenated) and passed through one 3×3×3 conv–GroupNorm–LeakyReLU. A 1×1×1 convolution gives
the logits, upsampled trilinearly to the input size.

Every resampling is an upsampling by a power-of-two factor fixed at construction (the strides
divide one another and the patch), not to a size computed from the input: resizing to sizes
(``blocks.resize_to``, which turns them into Python ints) put the example's sizes into a traced
(ONNX) graph as constants, so it returned the example's output size for every other input size.
With factors the graph takes any multiple of the patch, and the result is the same as resizing
to the size (``align_corners=False`` at an exact integer ratio; checked bit for bit).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import conv_norm_act, group_norm_spec, power_of_two_log
from .taps import NUM_TAPS

FUSIONS = ("sum", "concat")


def fusion_strides(patch_size: int, finest_stride: int, num_taps: int = NUM_TAPS) -> list[int]:
    """Stride (input / map) at which each tap is fused, shallowest first: ``max(p / 2**(n-1-k), finest)``.

    Example:
        >>> fusion_strides(16, 2), fusion_strides(8, 2)
        ([2, 4, 8, 16], [2, 2, 4, 8])
    """
    return [max(patch_size // 2 ** (num_taps - 1 - k), finest_stride, 1) for k in range(num_taps)]


def upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``(B, C, *S)`` → ``(B, C, *S * factor)`` trilinearly (``factor`` an int >= 1; 1 returns ``x``)."""
    if factor == 1:
        return x
    return F.interpolate(x, scale_factor=float(factor), mode="trilinear", align_corners=False)


class UNetFusionHead(nn.Module):
    """Lateral projections + progressive coarse-to-fine fusion + 1×1×1 classifier.

    Args:
        embed_dim: ViT width ``E``.
        patch_size: ViT patch ``p`` (a power of two).
        out_channels: classes / label channels ``K``.
        width: channels of every lateral projection and fusion stage.
        fusion: ``sum`` (add, then conv) or ``concat`` (concatenate, then conv ``2w → w``).
        finest_stride: finest resolution fused (``1/finest_stride`` of the input; a power of two
            at most the patch); the logits are upsampled trilinearly from there.

    Shapes (patch 16, finest 2): taps ``(B, E, H/16, ..)`` → fused maps ``(B, w, H/s, ..)`` at
    ``s = 16, 8, 4, 2`` → logits ``(B, K, H, W, D)``.

    Example:
        >>> head = UNetFusionHead(embed_dim=32, patch_size=16, out_channels=3, width=8)
        >>> head(torch.randn(1, 1, 32, 32, 32), [torch.randn(1, 32, 2, 2, 2)] * 4).shape
        torch.Size([1, 3, 32, 32, 32])
    """

    def __init__(self, embed_dim: int, patch_size: int, out_channels: int, width: int = 32,
                 fusion: str = "sum", finest_stride: int = 2):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"UNetFusion fusion must be one of {', '.join(FUSIONS)} (model.unetfusion.fusion), "
                             f"got '{fusion}'")
        if min(width, out_channels) < 1:
            raise ValueError(f"UNetFusion: width ({width}) and out_channels ({out_channels}) must be >= 1")
        power_of_two_log(patch_size, "UNetFusion patch size")
        power_of_two_log(finest_stride, "UNetFusion finest_stride (model.unetfusion.finest_stride)")
        if finest_stride > patch_size:  # coarser than the patch grid would need downsampling by sizes
            raise ValueError(f"UNetFusion finest_stride (model.unetfusion.finest_stride) must be at most the "
                             f"patch size {patch_size}, got {finest_stride}")
        self.patch_size = patch_size
        self.fusion = fusion
        self.strides = fusion_strides(patch_size, finest_stride)
        norm = group_norm_spec(width)
        self.laterals = nn.ModuleList([nn.Conv3d(embed_dim, width, 1) for _ in range(NUM_TAPS)])
        fused_in = width if fusion == "sum" else 2 * width
        self.stages = nn.ModuleList([conv_norm_act(width if k == NUM_TAPS - 1 else fused_in, width, norm)
                                     for k in range(NUM_TAPS)])
        self.classifier = nn.Conv3d(width, out_channels, 1)

    def forward(self, image: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Segment.

        Args:
            image: ``(B, C, H, W, D)``, sides multiples of the patch (unused: the features give the sizes).
            features: 4 maps ``(B, E, H/p, W/p, D/p)``, shallowest tap first.

        Returns:
            logits ``(B, K, H, W, D)``.
        """
        if len(features) != NUM_TAPS:
            raise ValueError(f"UNetFusion expects {NUM_TAPS} feature maps, got {len(features)}")
        x = None
        for k in reversed(range(NUM_TAPS)):
            lateral = upsample(self.laterals[k](features[k]), self.patch_size // self.strides[k])
            if x is None:
                x = lateral
            else:
                x = upsample(x, self.strides[k + 1] // self.strides[k])
                x = x + lateral if self.fusion == "sum" else torch.cat([x, lateral], dim=1)
            x = self.stages[k](x)
        return upsample(self.classifier(x), self.strides[0])
