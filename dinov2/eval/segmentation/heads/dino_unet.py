"""Dino U-Net head in 3D: spatial prior + ViT-Adapter interaction + FAPM + nnU-Net-style decoder.

1. A convolutional spatial-prior stem (the ViT-Adapter's :class:`SpatialPriorModule` with a first
   stride of 2) gives maps at 1/2, 1/4, 1/8 and 1/16 of the input, projected to the ViT width.
2. The 1/4..1/16 maps interact with the backbone through the ViT-Adapter injectors/extractors
   (:class:`AdapterInteraction`); each of the 4 stage outputs (1/p) is resampled to one scale
   (shallowest tap to 1/2, deepest to 1/16) and added.
3. Per scale a :class:`FidelityAwareProjection` brings the ``E``-wide map to rank ``r`` (one shared
   basis projection for all scales), and a 2×2×2 transposed convolution lifts it to a U-Net level:
   scale 1/2^(l+1) → level l at 1/2^l (full resolution, 1/2, 1/4, 1/8) with that level's width.
4. :class:`UNetDecoder` (nnU-Net style) decodes the four levels to logits.

The decoder widths follow the backbone's width (``size``): S (E <= 384) 32/64/128/256,
B (E <= 768) 1.5x, L (wider) 2x, full resolution first.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .blocks import check_sides, group_norm, resize_to
from .fapm import FidelityAwareProjection
from .unet_decoder import UNetDecoder
from .vit_adapter import AdapterInteraction, BackboneIO, SpatialPriorModule

SIZE_BASE_WIDTH = {"S": 32, "B": 48, "L": 64}  # full-resolution decoder width; doubles per level
NUM_LEVELS = 4  # U-Net levels: full resolution, 1/2, 1/4, 1/8 (from the scales 1/2 .. 1/16)
COARSEST_STRIDE = 2 ** NUM_LEVELS


def size_for_embed_dim(embed_dim: int) -> str:
    """The size preset of a backbone width: ``S`` up to 384, ``B`` up to 768, ``L`` beyond."""
    return "S" if embed_dim <= 384 else "B" if embed_dim <= 768 else "L"


def decoder_widths(size: str, embed_dim: int) -> list[int]:
    """Decoder widths (full resolution first) of ``size`` (``auto`` | ``S`` | ``B`` | ``L``)."""
    key = size_for_embed_dim(embed_dim) if str(size).lower() == "auto" else str(size).upper()
    if key not in SIZE_BASE_WIDTH:
        raise ValueError(f"DinoUNet size must be auto, S, B or L (model.dinounet.size), got '{size}'")
    return [SIZE_BASE_WIDTH[key] * 2 ** level for level in range(NUM_LEVELS)]


class DinoUNetHead(AdapterInteraction):
    """Dino U-Net decoder driving the backbone (see the module docstring).

    Args:
        embed_dim: ViT width ``E``.
        patch_size: ViT patch ``p``.
        in_channels: image channels (all modalities).
        out_channels: classes / label channels ``K``.
        taps: 4 increasing block indices where the interaction stages end (evenly spaced).
        size: ``auto`` (from ``E``), ``S``, ``B`` or ``L``: the decoder widths.
        widths: explicit decoder widths (4, full resolution first); overrides ``size``.
        rank: FAPM rank ``r``; ``None`` = the full-resolution decoder width x 2.
        num_heads: deformable-attention heads (``E`` and ``E/2`` divisible by it).
        n_points: deformable-attention sampling points per head and level.
        ffn_ratio: hidden width of the extractor FFN relative to ``E``.
        spm_width: channels of the spatial-prior stem's first (1/2) stage.
        deep_supervision: in training mode return logits at full, 1/2 and 1/4 resolution.

    Shapes (input ``(B, C, H, W, D)``, sides multiples of ``lcm(16, p)``): stem and scales at
    ``H/2 .. H/16`` with ``E`` channels; FAPM ``r`` channels; levels ``H .. H/8`` with ``widths``.

    Example:
        >>> # driven by SegmentationModel (tests/eval/test_heads_dense.py)
    """

    drives_backbone = True  # SegmentationModel passes itself (the backbone interface), not features

    def __init__(self, embed_dim: int, patch_size: int, in_channels: int, out_channels: int,
                 taps: Sequence[int], size: str = "auto", widths: Sequence[int] | None = None,
                 rank: int | None = None, num_heads: int = 8, n_points: int = 4, ffn_ratio: float = 0.25,
                 spm_width: int = 32, deep_supervision: bool = False):
        widths = [int(w) for w in widths] if widths is not None else decoder_widths(size, embed_dim)
        if len(widths) != NUM_LEVELS:
            raise ValueError(f"DinoUNet needs {NUM_LEVELS} decoder widths (model.dinounet.widths), got {widths}")
        rank = int(rank) if rank is not None else 2 * widths[0]
        if min(in_channels, out_channels, spm_width, rank, *widths) < 1:
            raise ValueError("DinoUNet: channel counts, widths, rank and spm_width must be >= 1")
        super().__init__(embed_dim, taps, num_heads, n_points, ffn_ratio)
        self.multiple = math.lcm(COARSEST_STRIDE, patch_size)
        self.widths, self.rank = widths, rank
        self.spm = SpatialPriorModule(in_channels, embed_dim, first_stride=2, width=spm_width)
        self.scale_norms = nn.ModuleList([group_norm(embed_dim) for _ in range(NUM_LEVELS)])
        self.basis = nn.Conv3d(embed_dim, rank, 1)  # shared by the FAPM of every scale
        self.fapm = nn.ModuleList([FidelityAwareProjection(embed_dim, rank) for _ in range(NUM_LEVELS)])
        self.to_level = nn.ModuleList([nn.ConvTranspose3d(rank, w, 2, stride=2) for w in widths])
        self.decoder = UNetDecoder(widths, out_channels, deep_supervision)

    def scales(self, image: torch.Tensor, backbone_io: BackboneIO) -> list[torch.Tensor]:
        """Stem maps fused with the backbone's stage outputs: 4 maps ``(B, E, H/s, W/s, D/s)``, ``s = 2, 4, 8, 16``."""
        c1, *pyramid = self.spm(image)
        levels, stage_outputs = self.interact(pyramid, image, backbone_io)
        return [c + resize_to(v, c.shape[2:]) for c, v in zip([c1, *levels], stage_outputs)]

    def forward(self, image: torch.Tensor, backbone_io: BackboneIO) -> torch.Tensor | list[torch.Tensor]:
        """Segment.

        Args:
            image: ``(B, C, H, W, D)``, every side a multiple of ``lcm(16, p)``.
            backbone_io: the wrapper's backbone interface.

        Returns:
            logits ``(B, K, H, W, D)``; with deep supervision in training mode a list of logits at
            ``H, H/2, H/4`` (decreasing resolution).
        """
        check_sides(image, self.multiple, "DinoUNet")
        skips = []
        for x, norm, fapm, up in zip(self.scales(image, backbone_io), self.scale_norms, self.fapm, self.to_level):
            x = norm(x)
            skips.append(up(fapm(x, self.basis(x))))
        return self.decoder(skips)
