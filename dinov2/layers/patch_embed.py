"""3D patch embedding: a Conv3d whose kernel equals its stride."""

from __future__ import annotations

import torch
from torch import nn

from dinov2.utils.errors import UserError


def to_3tuple(value: int | tuple[int, int, int] | list[int]) -> tuple[int, int, int]:
    """Expand an int to a 3-tuple; validate a sequence of three ints."""
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"Expected an int or 3 values, got {value}")
    return value  # type: ignore[return-value]


class PatchGridError(UserError, ValueError):
    """A spatial size that is not a multiple of the patch size (callers that know which setting
    chose the size catch it and name that setting)."""

    def __init__(self, spatial: tuple[int, ...], patch_size: tuple[int, int, int]):
        super().__init__(f"Input spatial size {spatial} is not a multiple of the patch size {patch_size}: "
                         "crop or pad the volume (e.g. MONAI DivisiblePad / ResizeWithPadOrCrop).")
        self.spatial, self.patch_size = spatial, patch_size


class PatchEmbed3D(nn.Module):
    """Split a volume into non-overlapping cubic patches and project each to ``embed_dim``.

    Args:
        patch_size: side of a patch in voxels (int or 3-tuple).
        in_chans: input channels (modalities).
        embed_dim: token width.

    Shapes:
        input ``(B, C, H, W, D)`` with each spatial side a multiple of the patch size;
        output ``(B, N, embed_dim)`` with ``N = (H/p)(W/p)(D/p)``, tokens ordered as the
        Conv3d output flattened over (H, W, D) (D varies fastest).
    """

    def __init__(self, patch_size: int | tuple[int, int, int] = 16, in_chans: int = 1, embed_dim: int = 768):
        super().__init__()
        self.patch_size = to_3tuple(patch_size)
        if in_chans < 1 or embed_dim < 1:
            raise ValueError(f"in_chans and embed_dim must be positive, got {in_chans}, {embed_dim}")
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def grid_size(self, spatial: tuple[int, int, int] | torch.Size) -> tuple[int, int, int]:
        """Token grid ``(h, w, d)`` for a spatial input size, with a clear error if not divisible."""
        if len(spatial) != 3:
            raise ValueError(f"Expected 3 spatial dims (H, W, D), got {tuple(spatial)}")
        bad = [s for s, p in zip(spatial, self.patch_size) if s % p]
        if bad:
            raise PatchGridError(tuple(int(s) for s in spatial), self.patch_size)
        return tuple(s // p for s, p in zip(spatial, self.patch_size))  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W, D)`` → ``(B, N, embed_dim)``."""
        if x.ndim != 5:
            raise ValueError(f"PatchEmbed3D expects a 5D tensor (B, C, H, W, D), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"Input has {x.shape[1]} channels but the model was built with in_chans={self.in_chans}")
        self.grid_size(x.shape[2:])
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2)
