"""ViT-Adapter-UNETR: a 3D ViT-Adapter (Chen et al., ICLR 2023) with a UNETR-style decoder.

A small CNN (the *spatial prior module*) builds a feature pyramid at strides ``p/4, p/2, p, 2p``
(``p`` = ViT patch). The ViT's blocks are split into 4 stages ending at the evenly spaced taps;
before each stage an *injector* lets the ViT tokens gather pyramid features by multi-scale
deformable attention (scaled by a zero-initialised ``gamma`` so a pretrained backbone starts
unchanged); after each stage an *extractor* lets the pyramid gather the updated ViT tokens and
refines it with a convolutional FFN. The stage outputs of the ViT are resampled to the four
pyramid strides and added to the pyramid; a UNETR-style decoder (MONAI blocks) with image-level
skips brings them back to full resolution.

The head drives the backbone through a small interface (``backbone_io``) supplied by
:class:`dinov2.eval.segmentation.model.SegmentationModel`, which also handles several modalities
(each through the backbone, ViT features merged per stage).
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import nn

from .blocks import group_norm
from .ms_deform_attn3d import MSDeformAttn3D, voxel_centres
from .taps import NUM_TAPS


class BackboneIO(Protocol):
    """What the adapter needs from the backbone wrapper (see ``SegmentationModel``)."""

    def embed(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]: ...
    def run_blocks(self, tokens: torch.Tensor, start: int, stop: int) -> torch.Tensor: ...
    def patch_tokens(self, tokens: torch.Tensor) -> torch.Tensor: ...
    def set_patch_tokens(self, tokens: torch.Tensor, patches: torch.Tensor) -> torch.Tensor: ...
    def merge_tokens(self, patches: torch.Tensor, tap: int, grid: Sequence[int]) -> torch.Tensor: ...
    @property
    def num_modalities(self) -> int: ...


def _conv_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         group_norm(cout), nn.ReLU(inplace=True))


class SpatialPriorModule(nn.Module):
    """CNN pyramid at strides ``s, 2s, 4s, 8s``, each projected to the ViT width.

    The ViT-Adapter uses ``s = p/4`` (strides ``p/4 .. 2p``); the Dino U-Net head ``s = 2``
    (``1/2 .. 1/16`` of the input, whatever the patch).

    Args:
        in_channels: image channels (all modalities).
        embed_dim: ViT width ``E``.
        first_stride: ``s``, a power of two >= 1.
        width: channels of the first stage (doubled twice further down).
    """

    def __init__(self, in_channels: int, embed_dim: int, first_stride: int, width: int = 64):
        super().__init__()
        stem_downs = int(math.log2(first_stride))
        if first_stride < 1 or 2 ** stem_downs != first_stride:
            raise ValueError(f"SpatialPriorModule needs a power-of-two first stride, got {first_stride}")
        layers = [_conv_block(in_channels, width, 2 if stem_downs else 1)]
        layers += [_conv_block(width, width, 2) for _ in range(max(stem_downs - 1, 0))]
        layers.append(_conv_block(width, width, 1))
        self.stem = nn.Sequential(*layers)
        self.down2 = _conv_block(width, 2 * width, 2)
        self.down3 = _conv_block(2 * width, 4 * width, 2)
        self.down4 = _conv_block(4 * width, 4 * width, 2)
        self.proj = nn.ModuleList([nn.Conv3d(c, embed_dim, 1) for c in (width, 2 * width, 4 * width, 4 * width)])

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C, H, W, D)`` → 4 maps ``(B, E, H/t, W/t, D/t)`` for ``t = s, 2s, 4s, 8s``."""
        c1 = self.stem(image)
        c2 = self.down2(c1)
        c3 = self.down3(c2)
        c4 = self.down4(c3)
        return [proj(c) for proj, c in zip(self.proj, (c1, c2, c3, c4))]


class ConvFFN(nn.Module):
    """Token MLP with a depthwise 3×3×3 convolution on each pyramid level in between."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv3d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, shapes: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """``x``: ``(B, sum_l N_l, dim)`` (levels concatenated) → same shape."""
        x = self.fc1(x)
        b, _, c = x.shape
        parts = []
        for part, shape in zip(x.split([math.prod(s) for s in shapes], dim=1), shapes):
            grid = part.transpose(1, 2).reshape(b, c, *shape)
            parts.append(self.dwconv(grid).flatten(2).transpose(1, 2))
        return self.fc2(F.gelu(torch.cat(parts, dim=1)))


class Injector(nn.Module):
    """ViT tokens ← pyramid (3 levels), added with a zero-initialised per-channel scale."""

    def __init__(self, dim: int, n_heads: int, n_points: int):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.feat_norm = nn.LayerNorm(dim)
        self.attn = MSDeformAttn3D(dim, n_heads, n_levels=3, n_points=n_points)
        self.gamma = nn.Parameter(torch.zeros(dim))

    def forward(self, x, ref, feat, shapes):
        return x + self.gamma * self.attn(self.query_norm(x), ref, self.feat_norm(feat), shapes)


class Extractor(nn.Module):
    """Pyramid ← ViT tokens (1 level), then a convolutional FFN."""

    def __init__(self, dim: int, n_heads: int, n_points: int, ffn_ratio: float):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.feat_norm = nn.LayerNorm(dim)
        self.attn = MSDeformAttn3D(dim, n_heads, n_levels=1, n_points=n_points, value_ratio=0.5)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = ConvFFN(dim, int(dim * ffn_ratio))

    def forward(self, c, ref, x, vit_shape, pyramid_shapes):
        c = c + self.attn(self.query_norm(c), ref, self.feat_norm(x), [vit_shape])
        return c + self.ffn(self.ffn_norm(c), pyramid_shapes)


class AdapterInteraction(nn.Module):
    """Base of the heads that interact with the backbone the ViT-Adapter way.

    The ViT's blocks run in 4 stages ending at ``taps``; before each stage an :class:`Injector`
    adds to the patch tokens what they gather from 3 pyramid levels, after it an
    :class:`Extractor` updates the pyramid from the stage's (normed, modality-merged) tokens.
    The modules live on the head itself (``injectors``, ``extractors``, ``level_embed``), so the
    parameter names of existing ViTAdapterUNETR checkpoints are unchanged.

    Args:
        embed_dim: ViT width ``E``.
        taps: 4 block indices (0-based, increasing) at which the stages end.
        num_heads: deformable-attention heads (``E`` and ``E/2`` divisible by it).
        n_points: sampling points per head and level.
        ffn_ratio: hidden width of the extractor FFN relative to ``E``.
    """

    def __init__(self, embed_dim: int, taps: Sequence[int], num_heads: int, n_points: int, ffn_ratio: float):
        super().__init__()
        name = type(self).__name__
        taps = [int(t) for t in taps]
        if len(taps) != NUM_TAPS or sorted(set(taps)) != taps or taps[0] < 0:
            raise ValueError(f"{name} needs {NUM_TAPS} increasing block indices, got {taps}")
        if embed_dim % num_heads or (embed_dim // 2) % num_heads:
            raise ValueError(f"{name}: embed_dim {embed_dim} and embed_dim/2 must be divisible by "
                             f"num_heads={num_heads}; set the head's num_heads option to a divisor")
        if n_points < 1:
            raise ValueError(f"{name}: n_points must be >= 1, got {n_points}")
        self.taps = taps
        self.level_embed = nn.Parameter(torch.zeros(3, embed_dim))
        nn.init.normal_(self.level_embed, std=0.02)
        self.injectors = nn.ModuleList([Injector(embed_dim, num_heads, n_points) for _ in taps])
        self.extractors = nn.ModuleList([Extractor(embed_dim, num_heads, n_points, ffn_ratio) for _ in taps])

    def interact(self, pyramid: Sequence[torch.Tensor], image: torch.Tensor,
                 backbone_io: BackboneIO) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run the backbone in stages, exchanging information with ``pyramid``.

        Args:
            pyramid: 3 maps ``(B, E, *s_l)`` (any sizes; deformable attention uses normalised
                coordinates).
            image: ``(B, C, H, W, D)``, every side a multiple of the patch.
            backbone_io: the wrapper's backbone interface.

        Returns:
            ``(updated pyramid: 3 maps (B, E, *s_l), stage outputs: 4 maps (B, E, H/p, W/p, D/p))``,
            the stage outputs shallowest first.
        """
        b, m = image.shape[0], backbone_io.num_modalities
        shapes = [tuple(t.shape[2:]) for t in pyramid]
        c = torch.cat([t.flatten(2).transpose(1, 2) + self.level_embed[k] for k, t in enumerate(pyramid)], dim=1)
        tokens, grid = backbone_io.embed(image)  # (B*M, T, E)
        device, dtype = image.device, c.dtype
        vit_ref = voxel_centres(grid, device, dtype)[None, :, None, :].expand(b * m, -1, 1, -1)
        pyr_ref = torch.cat([voxel_centres(s, device, dtype) for s in shapes])[None, :, None, :].expand(b, -1, 1, -1)

        outputs, start = [], 0
        for k, (injector, extractor, tap) in enumerate(zip(self.injectors, self.extractors, self.taps)):
            feat = c.repeat_interleave(m, dim=0) if m > 1 else c  # every modality's tokens see the pyramid
            patches = injector(backbone_io.patch_tokens(tokens), vit_ref, feat, shapes)
            tokens = backbone_io.run_blocks(backbone_io.set_patch_tokens(tokens, patches), start, tap + 1)
            start = tap + 1
            merged = backbone_io.merge_tokens(backbone_io.patch_tokens(tokens), k, grid)  # (B, N, E)
            c = extractor(c, pyr_ref, merged, grid, shapes)
            outputs.append(merged.transpose(1, 2).reshape(b, -1, *grid))
        levels = [t.transpose(1, 2).reshape(b, -1, *s)
                  for t, s in zip(c.split([math.prod(s) for s in shapes], dim=1), shapes)]
        return levels, outputs


class ViTAdapterUNETRHead(AdapterInteraction):
    """ViT-Adapter interaction with the backbone + UNETR-style decoder.

    Args:
        embed_dim: ViT width ``E``.
        patch_size: ViT patch ``p`` (power of two >= 8).
        in_channels: image channels (all modalities).
        out_channels: classes / label channels.
        taps: 4 block indices (0-based, increasing) at which the interaction stages end; the
            last must be ``depth - 1``.
        num_heads: deformable-attention heads (``E`` and ``E/2`` divisible by it).
        n_points: sampling points per head and level.
        ffn_ratio: hidden width of the extractor FFN relative to ``E``.
        spm_width: channels of the spatial prior module's first stage.
        feature_size: width of the full-resolution decoder level (doubles per level, capped at 8x).
        norm_name: MONAI norm of the decoder blocks.
        res_block: residual decoder blocks.

    Example:
        >>> # see tests/eval/test_segmentation_heads.py; driven by SegmentationModel
    """

    drives_backbone = True  # SegmentationModel passes itself (the backbone interface), not features

    def __init__(self, embed_dim: int, patch_size: int, in_channels: int, out_channels: int,
                 taps: Sequence[int], num_heads: int = 8, n_points: int = 4, ffn_ratio: float = 0.25,
                 spm_width: int = 64, feature_size: int = 16, norm_name: str | tuple = "instance",
                 res_block: bool = True):
        if patch_size < 8 or 2 ** int(round(math.log2(patch_size))) != patch_size:
            raise ValueError(f"ViTAdapterUNETRHead needs a power-of-two patch size >= 8, got {patch_size}")
        if min(in_channels, out_channels, feature_size, spm_width) < 1:
            raise ValueError("ViTAdapterUNETRHead: channel counts and spm_width must be >= 1")
        super().__init__(embed_dim, taps, num_heads, n_points, ffn_ratio)
        self.patch_size = patch_size
        self.spm = SpatialPriorModule(in_channels, embed_dim, patch_size // 4, spm_width)

        # Decoder levels: l = log2(stride). Image-derived skips below p/4, adapter features from p/4 to 2p.
        self.first_adapter_level = int(math.log2(patch_size // 4))
        self.levels = self.first_adapter_level + 4
        width = [feature_size * 2 ** min(level, 3) for level in range(self.levels)]
        image_blocks = [UnetrBasicBlock(3, in_channels, width[0], kernel_size=3, stride=1,
                                        norm_name=norm_name, res_block=res_block)]
        for level in range(1, self.first_adapter_level):
            image_blocks.append(UnetrBasicBlock(3, width[level - 1], width[level], kernel_size=3, stride=2,
                                                norm_name=norm_name, res_block=res_block))
        self.image_blocks = nn.ModuleList(image_blocks)
        self.feature_norms = nn.ModuleList([group_norm(embed_dim) for _ in range(4)])
        self.feature_proj = nn.ModuleList([
            nn.Conv3d(embed_dim, width[self.first_adapter_level + k], 1) for k in range(4)])
        self.decoders = nn.ModuleList([
            UnetrUpBlock(3, width[level + 1], width[level], kernel_size=3, upsample_kernel_size=2,
                         norm_name=norm_name, res_block=res_block)
            for level in reversed(range(self.levels - 1))
        ])
        self.out = UnetOutBlock(3, width[0], out_channels)

    def forward(self, image: torch.Tensor, backbone_io: BackboneIO) -> torch.Tensor:
        """Segment.

        Args:
            image: ``(B, C, H, W, D)``, every side a multiple of ``2 * patch_size``.
            backbone_io: the wrapper's backbone interface.

        Returns:
            logits ``(B, out_channels, H, W, D)``.
        """
        bad = [s for s in image.shape[2:] if s % (2 * self.patch_size)]
        if bad:
            raise ValueError(f"ViTAdapterUNETRHead needs every spatial side to be a multiple of 2 x patch "
                             f"({2 * self.patch_size}), got {tuple(image.shape[2:])}; change dataset.image_size (--image-size)")
        c1, *pyramid = self.spm(image)  # c1..c4 at p/4, p/2, p, 2p; c1 stays out of the interaction
        c_levels, outputs = self.interact(pyramid, image, backbone_io)
        fused = [
            c1 + F.interpolate(outputs[0], size=c1.shape[2:], mode="trilinear", align_corners=False),
            c_levels[0] + F.interpolate(outputs[1], size=c_levels[0].shape[2:], mode="trilinear", align_corners=False),
            c_levels[1] + outputs[2],
            c_levels[2] + F.max_pool3d(outputs[3], kernel_size=2, stride=2),
        ]
        skips = {}
        x = image
        for level, block in enumerate(self.image_blocks):
            x = block(x)
            skips[level] = x
        for k, (norm, proj, f) in enumerate(zip(self.feature_norms, self.feature_proj, fused)):
            skips[self.first_adapter_level + k] = proj(norm(f))
        x = skips[self.levels - 1]
        for level, decoder in zip(reversed(range(self.levels - 1)), self.decoders):
            x = decoder(x, skips[level])
        return self.out(x)
