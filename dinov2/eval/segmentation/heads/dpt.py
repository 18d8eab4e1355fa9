"""Dense Prediction Transformer (DPT) head in 3D.

Four taps are *reassembled* into an image-like pyramid: the CLS token is folded into the patch
tokens (``readout``), a 1×1×1 projection sets the level's width, and a resampling brings the
``1/p`` grid to 1/4, 1/8, 1/16 and 1/32 of the input (transposed convolutions up, strided 3×3×3
convolutions down; the factors ``p / (4 * 2**k)`` follow the patch, so patch 8 and 16 both work).
The levels are projected to one fusion width and fused coarse to fine (residual conv units,
trilinear upsampling); a small head brings the 1/2-resolution result to full resolution.
GroupNorm (batch-size independent) normalises the fusion path and the output head.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import check_sides, group_norm, power_of_two_log
from .taps import NUM_TAPS

READOUTS = ("ignore", "add", "project")
FIRST_STRIDE = 4  # the shallowest reassembled level is at 1/4 of the input


class Readout(nn.Module):
    """Fold the CLS token into the patch tokens: ``(B, E, *g)`` + ``(B, E)`` → ``(B, E, *g)``.

    ``ignore`` drops it, ``add`` adds it to every patch, ``project`` concatenates it to every patch
    and maps ``2E → E`` (1×1×1 convolution + GELU).
    """

    def __init__(self, embed_dim: int, mode: str):
        super().__init__()
        if mode not in READOUTS:
            raise ValueError(f"DPT readout must be one of {', '.join(READOUTS)} (model.dpt.readout), got '{mode}'")
        self.mode = mode
        self.proj = nn.Sequential(nn.Conv3d(2 * embed_dim, embed_dim, 1), nn.GELU()) if mode == "project" else None

    def forward(self, patches: torch.Tensor, cls: torch.Tensor | None) -> torch.Tensor:
        """``patches`` ``(B, E, *g)``, ``cls`` ``(B, E)`` (``None`` allowed with ``ignore``) → ``(B, E, *g)``."""
        if self.mode == "ignore":
            return patches
        cls = cls[:, :, None, None, None].expand_as(patches)
        if self.mode == "add":
            return patches + cls
        return self.proj(torch.cat([patches, cls], dim=1))


def resampler(channels: int, factor: Fraction) -> nn.Module:
    """Change the resolution of ``(B, C, *g)`` by ``factor`` (a power of two): ``(B, C, *g * factor)``.

    Up: one transposed convolution with kernel = stride = factor. Down: ``log2(1/factor)``
    3×3×3 stride-2 convolutions. 1: identity.
    """
    if factor > 1:
        return nn.ConvTranspose3d(channels, channels, int(factor), stride=int(factor))
    if factor == 1:
        return nn.Identity()
    steps = power_of_two_log(int(1 / factor), "DPT resampling factor")
    return nn.Sequential(*[nn.Conv3d(channels, channels, 3, stride=2, padding=1) for _ in range(steps)])


class ResidualConvUnit(nn.Module):
    """``x + norm(conv(act(norm(conv(act(x))))))`` with 3×3×3 convolutions: ``(B, C, *S)`` → same.

    GroupNorm (batch-size independent) keeps the un-normalised residual sums of the fusion path
    from spiking early in training.
    """

    def __init__(self, channels: int):
        super().__init__()
        def conv_norm() -> list[nn.Module]:
            return [nn.Conv3d(channels, channels, 3, padding=1, bias=False), group_norm(channels)]

        self.body = nn.Sequential(nn.ReLU(), *conv_norm(), nn.ReLU(), *conv_norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual refinement of ``x``."""
        return x + self.body(x)


class FusionBlock(nn.Module):
    """One coarse-to-fine fusion step: ``level`` (+ refined coarser result) → refined, upsampled.

    Args:
        channels: the fusion width ``F``.
        with_coarser: whether a coarser result is added (all but the deepest level).
    """

    def __init__(self, channels: int, with_coarser: bool):
        super().__init__()
        self.skip = ResidualConvUnit(channels) if with_coarser else None
        self.merge = ResidualConvUnit(channels)
        self.out = nn.Conv3d(channels, channels, 1)

    def forward(self, level: torch.Tensor, coarser: torch.Tensor | None, size: Sequence[int]) -> torch.Tensor:
        """``level``, ``coarser``: ``(B, F, *S)`` → ``(B, F, *size)``."""
        x = level if self.skip is None else self.skip(level) + coarser
        x = F.interpolate(self.merge(x), size=tuple(size), mode="trilinear", align_corners=False)
        return self.out(x)


class DPTHead(nn.Module):
    """DPT decoder on four taps (with their CLS tokens unless ``readout`` is ``ignore``).

    Args:
        embed_dim: ViT width ``E``.
        patch_size: ViT patch ``p`` (a power of two).
        out_channels: classes / label channels ``K``.
        readout: CLS handling, one of :data:`READOUTS`.
        widths: channels of the 4 reassembled levels (1/4 .. 1/32).
        fusion_width: the common width ``F`` of the fusion path.
        head_width: channels of the last 3×3×3 convolution at full resolution.

    Shapes (input ``(B, C, H, W, D)``, sides multiples of ``lcm(32, p)``): taps ``(B, E, H/p, ..)``
    → levels ``(B, widths[k], H/(4·2^k), ..)`` → fusion ``(B, F, ..)`` at 1/32 .. 1/2 → logits
    ``(B, K, H, W, D)``.

    Example:
        >>> head = DPTHead(embed_dim=32, patch_size=16, out_channels=3, widths=(8, 8, 8, 8), fusion_width=8)
        >>> taps = [(torch.randn(1, 32, 2, 2, 2), torch.randn(1, 32)) for _ in range(4)]
        >>> head(torch.randn(1, 1, 32, 32, 32), taps).shape
        torch.Size([1, 3, 32, 32, 32])
    """

    def __init__(self, embed_dim: int, patch_size: int, out_channels: int, readout: str = "project",
                 widths: Sequence[int] = (32, 64, 128, 256), fusion_width: int = 64, head_width: int = 32):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) != NUM_TAPS or min(*widths, fusion_width, head_width, out_channels) < 1:
            raise ValueError(f"DPT needs {NUM_TAPS} positive widths (model.dpt.widths) and positive "
                             f"fusion_width / head_width, got {widths}, {fusion_width}, {head_width}")
        power_of_two_log(patch_size, "DPT patch size")
        self.needs_cls = readout != "ignore"  # SegmentationModel then passes (patches, cls) pairs
        self.multiple = math.lcm(FIRST_STRIDE * 2 ** (NUM_TAPS - 1), patch_size)
        self.readouts = nn.ModuleList([Readout(embed_dim, readout) for _ in range(NUM_TAPS)])
        self.project = nn.ModuleList([nn.Conv3d(embed_dim, w, 1) for w in widths])
        self.resample = nn.ModuleList([resampler(w, Fraction(patch_size, FIRST_STRIDE * 2 ** k))
                                       for k, w in enumerate(widths)])
        # Normalised on entering the fusion path and in the output head: without it the chain of linear
        # layers (projection, resampling, 3x3x3) let Adam inflate the logits within a few steps.
        self.to_fusion = nn.ModuleList([nn.Sequential(nn.Conv3d(w, fusion_width, 3, padding=1, bias=False),
                                                      group_norm(fusion_width)) for w in widths])
        self.fusion = nn.ModuleList([FusionBlock(fusion_width, with_coarser=k < NUM_TAPS - 1)
                                     for k in range(NUM_TAPS)])
        half = max(fusion_width // 2, 1)
        self.reduce = nn.Sequential(nn.Conv3d(fusion_width, half, 3, padding=1, bias=False), group_norm(half),
                                    nn.ReLU())  # at 1/2, before the last upsampling
        self.refine = nn.Sequential(nn.Conv3d(half, head_width, 3, padding=1, bias=False), group_norm(head_width),
                                    nn.ReLU())
        self.classify = nn.Conv3d(head_width, out_channels, 1)

    def reassemble(self, features: Sequence) -> list[torch.Tensor]:
        """Taps → 4 levels ``(B, widths[k], H/(4·2^k), ..)``, shallowest (finest) first.

        Args:
            features: 4 maps ``(B, E, *g)``, or ``(map, cls (B, E))`` pairs.
        """
        levels = []
        for k, feat in enumerate(features):
            patches, cls = feat if isinstance(feat, (tuple, list)) else (feat, None)
            if cls is None and self.needs_cls:
                raise ValueError("DPT with readout add/project needs each tap's CLS token: (patches, cls) pairs")
            levels.append(self.resample[k](self.project[k](self.readouts[k](patches, cls))))
        return levels

    def forward(self, image: torch.Tensor, features: Sequence) -> torch.Tensor:
        """Segment.

        Args:
            image: ``(B, C, H, W, D)``, every side a multiple of ``lcm(32, p)`` (only the size is used).
            features: 4 taps, shallowest first: maps ``(B, E, H/p, W/p, D/p)``, or
                ``(map, cls (B, E))`` pairs (needed unless ``readout`` is ``ignore``).

        Returns:
            logits ``(B, K, H, W, D)``.
        """
        if len(features) != NUM_TAPS:
            raise ValueError(f"DPT expects {NUM_TAPS} taps, got {len(features)}")
        check_sides(image, self.multiple, "DPT")
        levels = [proj(x) for proj, x in zip(self.to_fusion, self.reassemble(features))]
        x = None
        for k in reversed(range(NUM_TAPS)):  # 1/32 → 1/16 → 1/8 → 1/4 → 1/2
            finer = levels[k - 1].shape[2:] if k else [2 * s for s in levels[0].shape[2:]]
            x = self.fusion[k](levels[k], x, finer)
        x = F.interpolate(self.reduce(x), size=image.shape[2:], mode="trilinear", align_corners=False)
        return self.classify(self.refine(x))
