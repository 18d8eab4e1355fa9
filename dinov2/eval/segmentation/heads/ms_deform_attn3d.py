"""3D multi-scale deformable attention in plain PyTorch (``F.grid_sample`` on 5D tensors).

Each query looks at ``n_points`` locations per head and per feature level, placed at learned
offsets around its reference point, and takes a softmax-weighted sum of the (trilinearly
interpolated) values there (Deformable DETR, Zhu et al. 2021, extended to volumes). No custom
kernel: any head count, level count and spatial size, on CPU and GPU, with autograd.

Coordinate convention: volumes are ``(B, C, H, W, D)`` (MONAI order) and every position is a
triple in that same axis order, normalised to ``[0, 1]`` so that voxel ``i`` of an axis of size
``n`` has centre ``(i + 0.5) / n``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def voxel_centres(shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised centres of every voxel of a grid, flattened with the last axis fastest.

    Args:
        shape: ``(H, W, D)``.

    Returns:
        ``(H*W*D, 3)`` positions in ``[0, 1]`` (axis order H, W, D).
    """
    axes = [(torch.arange(n, device=device, dtype=dtype) + 0.5) / n for n in shape]
    grid = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grid], dim=-1)


def deformable_sample(values: Sequence[torch.Tensor], locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of values sampled at fractional locations, per head.

    Args:
        values: per level ``(B*heads, head_dim, H_l, W_l, D_l)``.
        locations: ``(B*heads, Nq, levels, points, 3)`` in ``[0, 1]`` (axis order H, W, D).
        weights: ``(B*heads, Nq, levels, points)``.

    Returns:
        ``(B*heads, head_dim, Nq)``.
    """
    out = 0
    for level, value in enumerate(values):
        # grid_sample's last grid coordinate indexes the input's first spatial axis: reverse to (D, W, H).
        grid = (2.0 * locations[:, :, level] - 1.0).flip(-1).unsqueeze(2)  # (BH, Nq, 1, P, 3)
        sampled = F.grid_sample(value, grid.to(value.dtype), mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # (BH, hd, Nq, 1, P)
        out = out + (sampled.squeeze(3) * weights[:, None, :, level].to(sampled.dtype)).sum(-1)
    return out


class MSDeformAttn3D(nn.Module):
    """Multi-scale deformable cross-attention for 3D feature pyramids.

    Args:
        dim: channels of queries and values.
        n_heads: attention heads (``dim`` must be divisible by it).
        n_levels: feature levels of the value input.
        n_points: sampling points per head and level.
        value_ratio: the values are projected to ``dim * value_ratio`` channels (ViT-Adapter
            uses 0.5 in its extractor to save memory).

    Example:
        >>> attn = MSDeformAttn3D(dim=32, n_heads=4, n_levels=2, n_points=2)
        >>> shapes = [(4, 4, 4), (2, 2, 2)]
        >>> value = torch.randn(1, 64 + 8, 32)
        >>> ref = torch.rand(1, 10, 2, 3)
        >>> attn(torch.randn(1, 10, 32), ref, value, shapes).shape
        torch.Size([1, 10, 32])
    """

    def __init__(self, dim: int, n_heads: int = 8, n_levels: int = 3, n_points: int = 4, value_ratio: float = 1.0):
        super().__init__()
        value_dim = int(round(dim * value_ratio))
        if min(dim, n_heads, n_levels, n_points) < 1:
            raise ValueError(f"MSDeformAttn3D: dim ({dim}), n_heads ({n_heads}), n_levels ({n_levels}) and "
                             f"n_points ({n_points}) must be >= 1")
        if value_dim % n_heads:
            raise ValueError(f"MSDeformAttn3D: value channels {value_dim} (dim {dim} x value_ratio {value_ratio}) "
                             f"must be divisible by n_heads={n_heads}")
        self.dim, self.n_heads, self.n_levels, self.n_points = dim, n_heads, n_levels, n_points
        self.value_dim = value_dim
        self.sampling_offsets = nn.Linear(dim, n_heads * n_levels * n_points * 3)
        self.attention_weights = nn.Linear(dim, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(dim, value_dim)
        self.output_proj = nn.Linear(value_dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero offset weights with biases spreading each head's points along its own direction.

        Head directions are deterministic points on the sphere, so at initialisation every head
        samples a different neighbourhood (points k at distance k voxels), as in Deformable DETR.
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        golden = torch.pi * (3.0 - 5.0 ** 0.5)
        idx = torch.arange(self.n_heads, dtype=torch.float32) + 0.5
        z = 1.0 - 2.0 * idx / self.n_heads
        r = torch.sqrt((1.0 - z * z).clamp_min(0.0))
        directions = torch.stack([r * torch.cos(golden * idx), r * torch.sin(golden * idx), z], dim=-1)
        directions = directions / directions.abs().amax(-1, keepdim=True)
        bias = directions[:, None, None, :].repeat(1, self.n_levels, self.n_points, 1)
        bias = bias * torch.arange(1, self.n_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor,
                spatial_shapes: Sequence[Sequence[int]]) -> torch.Tensor:
        """Attend from each query to its sampled neighbourhoods.

        Args:
            query: ``(B, Nq, dim)``.
            reference_points: ``(B, Nq, n_levels, 3)`` or ``(B, Nq, 1, 3)`` (same point on every
                level), normalised ``[0, 1]`` in (H, W, D) order.
            value: ``(B, sum_l H_l*W_l*D_l, dim)``: the levels flattened (last axis fastest) and
                concatenated in the order of ``spatial_shapes``.
            spatial_shapes: ``n_levels`` triples ``(H_l, W_l, D_l)``.

        Returns:
            ``(B, Nq, dim)``.
        """
        b, nq, _ = query.shape
        shapes = [tuple(int(s) for s in shape) for shape in spatial_shapes]
        if len(shapes) != self.n_levels:
            raise ValueError(f"MSDeformAttn3D built for {self.n_levels} levels, got {len(shapes)} spatial shapes")
        sizes = [h * w * d for h, w, d in shapes]
        if value.shape[1] != sum(sizes):
            raise ValueError(f"value has {value.shape[1]} tokens but the spatial shapes {shapes} hold {sum(sizes)}")
        if reference_points.shape[2] not in (1, self.n_levels) or reference_points.shape[-1] != 3:
            raise ValueError(f"reference_points must be (B, Nq, 1 or {self.n_levels}, 3), got {tuple(reference_points.shape)}")
        h, hd = self.n_heads, self.value_dim // self.n_heads
        v = self.value_proj(value).reshape(b, -1, h, hd).permute(0, 2, 3, 1).reshape(b * h, hd, -1)
        values = [lvl.reshape(b * h, hd, *shape) for lvl, shape in zip(v.split(sizes, dim=-1), shapes)]

        offsets = self.sampling_offsets(query).reshape(b, nq, h, self.n_levels, self.n_points, 3)
        # Offsets are learned in voxels of each level; convert to the normalised [0, 1] range.
        normaliser = torch.tensor(shapes, dtype=offsets.dtype, device=offsets.device)  # (levels, 3)
        ref = reference_points[:, :, None, :, None, :].to(offsets.dtype)  # (B, Nq, 1, L|1, 1, 3)
        locations = ref + offsets / normaliser[None, None, None, :, None, :]
        weights = self.attention_weights(query).reshape(b, nq, h, self.n_levels * self.n_points)
        weights = weights.softmax(-1).reshape(b, nq, h, self.n_levels, self.n_points)

        locations = locations.permute(0, 2, 1, 3, 4, 5).reshape(b * h, nq, self.n_levels, self.n_points, 3)
        weights = weights.permute(0, 2, 1, 3, 4).reshape(b * h, nq, self.n_levels, self.n_points)
        out = deformable_sample(values, locations, weights)  # (B*h, hd, Nq)
        out = out.reshape(b, h * hd, nq).transpose(1, 2)
        return self.output_proj(out)
