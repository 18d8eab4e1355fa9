"""Geometry of 3D random-resized crops, and one fused crop + resize + flip + rot90 resampling.

A crop is described by three independent draws:

* its **size** in voxels of the source volume (:func:`sample_crop_size`): an in-plane area
  fraction and aspect ratio for the two in-plane axes, and a length fraction for the
  through-plane axis;
* its **start** corner, uniform over the positions where the box fits (:func:`sample_crop_start`);
* its **orientation** (:func:`sample_orientation`): random flips of each axis followed by random
  90-degree rotations in each plane, composed into one signed axis permutation.

:func:`resized_crop` then produces the output cube with a single ``F.interpolate`` call on the
cropped sub-volume only. Flips and rotations by 90 degrees of the output cube commute with a
trilinear resize whose sample positions are symmetric (``align_corners=False``), so applying the
orientation to a *view* of the sub-volume before resizing, plus one flip of the small output, gives
the same result as MONAI's crop -> resize -> flip -> rotate chain, without the intermediate copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Planes in which a 90-degree rotation may be drawn, in the order they are applied.
ROTATION_PLANES: tuple[tuple[int, int], ...] = ((0, 1), (0, 2), (1, 2))


def check_range(name: str, value: Sequence[float], low: float, high: float | None = None) -> tuple[float, float]:
    """Validate a ``(min, max)`` pair with ``low <= min <= max <= high`` and return it as floats.

    Raises:
        ValueError: naming the argument ``name`` and the expected bounds.
    """
    if len(value) != 2:
        raise ValueError(f"{name} must be a (min, max) pair, got {value!r}.")
    a, b = float(value[0]), float(value[1])
    if not (low <= a <= b) or (high is not None and b > high):
        upper = "inf" if high is None else high
        raise ValueError(f"{name} must satisfy {low} <= min <= max <= {upper}, got {value!r}.")
    return a, b


def sample_crop_size(
    rng: np.random.Generator,
    shape: Sequence[int],
    area_scale: Sequence[float],
    aspect_ratio: Sequence[float],
    depth_scale: Sequence[float],
    max_tries: int = 10,
) -> tuple[int, int, int]:
    """Draw the size of a random-resized crop inside a volume of spatial ``shape``.

    The first two axes of ``shape`` are the in-plane axes (equal spacing), the last one the
    through-plane axis (see ``dinov2.data.transforms.in_plane_axis_order``). The crop's in-plane
    area ``h * w`` is a fraction ``s ~ U(area_scale)`` of the volume's in-plane area
    ``shape[0] * shape[1]``, with aspect ratio ``h / w = r``, ``log r ~ U(log aspect_ratio)``; its
    through-plane length is ``d = round(t * shape[2])`` with ``t ~ U(depth_scale)``. A draw whose
    ``h`` or ``w`` does not fit is redrawn (up to ``max_tries`` times, as torchvision's
    RandomResizedCrop does) and the last one is then clipped to the volume, so the realised area
    fraction can be a little below the drawn one near ``s = 1`` for non-square planes.

    Args:
        rng: generator the draws come from.
        shape: spatial shape ``(H, W, D)`` of the volume, in-plane axes first.
        area_scale: ``(min, max)`` in-plane area fraction, within ``(0, 1]``.
        aspect_ratio: ``(min, max)`` of ``h / w``.
        depth_scale: ``(min, max)`` through-plane length fraction, within ``(0, 1]``.
        max_tries: redraws of ``(s, r)`` before clipping.

    Returns:
        ``(h, w, d)``: crop size in voxels, each at least 1 and at most the volume's size.
    """
    height, width, depth = (int(n) for n in shape)
    if min(height, width, depth) < 1:
        raise ValueError(f"Cannot crop a volume of spatial shape {tuple(shape)}: every axis needs at least one voxel.")
    area = height * width
    log_ratio = (math.log(aspect_ratio[0]), math.log(aspect_ratio[1]))
    for _ in range(max_tries):
        target = area * rng.uniform(area_scale[0], area_scale[1])
        ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        h = int(round(math.sqrt(target * ratio)))
        w = int(round(math.sqrt(target / ratio)))
        if 1 <= h <= height and 1 <= w <= width:
            break
    h = min(max(h, 1), height)
    w = min(max(w, 1), width)
    d = min(max(int(round(depth * rng.uniform(depth_scale[0], depth_scale[1]))), 1), depth)
    return h, w, d


def sample_crop_start(rng: np.random.Generator, shape: Sequence[int], size: Sequence[int]) -> tuple[int, ...]:
    """Draw the first corner of a box of ``size`` uniformly among the positions inside ``shape``.

    Args:
        rng: generator the draws come from.
        shape: spatial shape of the volume.
        size: box size, each at most the matching entry of ``shape``.

    Returns:
        Start index per axis, ``0 <= start[i] <= shape[i] - size[i]``.
    """
    return tuple(int(rng.integers(0, int(n) - int(s) + 1)) for n, s in zip(shape, size))


@dataclass(frozen=True)
class Orientation:
    """A signed permutation of the three spatial axes.

    The oriented tensor is ``x.permute(axes).flip(flipped)`` on spatial axes: output axis ``j``
    runs along input axis ``axes[j]``, reversed when ``j in flipped``.
    """

    axes: tuple[int, int, int] = (0, 1, 2)
    flipped: tuple[int, ...] = ()

    def flip(self, axis: int) -> "Orientation":
        """Orientation after flipping output axis ``axis`` (like ``torch.flip(y, [axis])``)."""
        flipped = set(self.flipped) ^ {axis}
        return Orientation(self.axes, tuple(sorted(flipped)))

    def transpose(self, a: int, b: int) -> "Orientation":
        """Orientation after swapping output axes ``a`` and ``b`` (like ``y.transpose(a, b)``)."""
        axes = list(self.axes)
        axes[a], axes[b] = axes[b], axes[a]
        flipped = {b if j == a else a if j == b else j for j in self.flipped}
        return Orientation(tuple(axes), tuple(sorted(flipped)))

    def rot90(self, k: int, plane: tuple[int, int]) -> "Orientation":
        """Orientation after ``torch.rot90(y, k, dims=plane)`` (what MONAI's Rotate90 calls)."""
        a, b = plane
        k %= 4
        if k == 1:
            return self.flip(b).transpose(a, b)
        if k == 2:
            return self.flip(a).flip(b)
        if k == 3:
            return self.flip(a).transpose(a, b)
        return self

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Orient a tensor ``(..., X, Y, Z)`` on its last three axes (reference implementation)."""
        lead = x.dim() - 3
        y = x.permute(*range(lead), *(lead + a for a in self.axes))
        return y.flip([lead + j for j in self.flipped]) if self.flipped else y


def sample_orientation(rng: np.random.Generator, flip_prob: float, rotate90_prob: float) -> Orientation:
    """Draw random flips then random 90-degree rotations and compose them.

    Each axis is flipped with probability ``flip_prob`` (axes 0, 1, 2 in turn); then in each plane
    of :data:`ROTATION_PLANES` in turn, with probability ``rotate90_prob``, the volume is rotated
    by ``k * 90`` degrees, ``k`` uniform in {1, 2, 3} (MONAI's RandRotate90 with ``max_k=3``).

    Args:
        rng: generator the draws come from.
        flip_prob: probability of flipping each axis.
        rotate90_prob: probability of a rotation in each plane.

    Returns:
        The composed :class:`Orientation`.
    """
    orientation = Orientation()
    for axis in range(3):
        if rng.random() < flip_prob:
            orientation = orientation.flip(axis)
    for plane in ROTATION_PLANES:
        if rng.random() < rotate90_prob:
            orientation = orientation.rot90(int(rng.integers(1, 4)), plane)
    return orientation


def resized_crop(
    volume: torch.Tensor,
    start: Sequence[int],
    size: Sequence[int],
    out_size: int,
    orientation: Orientation = Orientation(),
) -> torch.Tensor:
    """Crop a box, resize it trilinearly to a cube and orient it, in one resampling.

    Equal (to float rounding) to MONAI's ``SpatialCrop`` -> ``Resize(mode="trilinear")`` ->
    flips -> ``Rotate90`` on the same box, but reads only the box and copies only the output.
    The input is never modified, so a cached volume can be passed without copying it.

    Args:
        volume: ``(C, X, Y, Z)`` plain tensor, any float dtype (float16 storage is upcast).
        start: first corner of the box, one index per spatial axis.
        size: box size in voxels, one per spatial axis.
        out_size: edge ``G`` of the output cube.
        orientation: signed axis permutation applied to the output.

    Returns:
        ``(C, G, G, G)`` float32 tensor, contiguous.
    """
    if volume.dim() != 4:
        raise ValueError(f"resized_crop expects a (C, X, Y, Z) volume, got shape {tuple(volume.shape)}.")
    region = volume[
        :,
        start[0] : start[0] + size[0],
        start[1] : start[1] + size[1],
        start[2] : start[2] + size[2],
    ]
    channels, depth = region.shape[0], region.shape[3]
    # Trilinear resizing is separable: bilinear over (X, Y) then linear over Z gives the same
    # sample positions and weights as F.interpolate(mode="trilinear"). Viewing Z as the channel
    # axis of a channels-last 2D image makes the bilinear kernel vectorise over Z, about twice
    # as fast on CPU as the 3D kernel, which cannot vectorise over a single channel. The view
    # already has channels-last strides, so for float32 this is no copy: the kernel reads the
    # box straight from the cached volume (float16 storage is converted in the same layout).
    planes = region.permute(0, 3, 1, 2).to(dtype=torch.float32, memory_format=torch.channels_last)
    planes = F.interpolate(planes, size=(out_size, out_size), mode="bilinear", align_corners=False)
    rows = planes.permute(0, 2, 3, 1).reshape(channels, out_size * out_size, depth)
    out = F.interpolate(rows, size=out_size, mode="linear", align_corners=False)
    out = out.view(channels, out_size, out_size, out_size)
    # Orienting the small output is cheaper than reading the large box in a permuted order.
    if orientation.axes != (0, 1, 2):
        out = out.permute(0, *(1 + a for a in orientation.axes)).contiguous()
    if orientation.flipped:
        out = out.flip([1 + j for j in orientation.flipped])
    return out
