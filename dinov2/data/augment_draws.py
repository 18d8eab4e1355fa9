"""Every random parameter of the DINO 3D multi-crop augmentation, drawn in one place.

Two places apply these draws: :class:`dinov2.data.augmentations.DataAugmentationDINO3d` crop by
crop on a data-loader worker, and :mod:`dinov2.data.device_augment` batched on the training
device (``crops.augment_on_device``). Both get their parameters from :func:`draw_sample`, so the
two paths have the same distributions by construction, and a sample's draws depend only on the
generator the loader seeded for its stream position (exact resume, any batch composition).

No draw looks at the voxels: the histogram shift draws its control points as fractions of the
crop's intensity range (:func:`histogram_control_points` scales them once the range is known),
so every draw can be made before any voxel is read, by a worker that then only cuts a box. The
order of the draws is the order in which the per-sample pipeline made them before this module
existed, so that pipeline's crops are unchanged (except that the histogram shift of a constant
crop now draws its control points too; before, it drew nothing and shifted the later draws).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from dinov2.data.crops import Orientation, sample_crop_size, sample_crop_start, sample_orientation

# The intensity transform a crop gets, by the index ``rng.integers(0, 3)`` draws.
INTENSITY_KINDS = ("contrast", "noise", "histogram")
NUMBER_OF_GLOBAL_CROPS = 2  # the DINO recipe: two teacher views with different blur settings


@dataclass(frozen=True)
class SharpenDraw:
    """Unsharp masking ``b1 + alpha * (b1 - G(sigma2) b1)`` with ``b1 = G(sigma1) x`` (per-axis sigmas, voxels)."""

    sigma1: tuple[float, float, float]
    sigma2: tuple[float, float, float]
    alpha: float


@dataclass(frozen=True)
class CropDraw:
    """The random choices of one crop, applied in this order: box, intensity, blur or sharpen, Gibbs.

    Attributes:
        start: first corner of the box, in voxels of the whole volume (region included).
        size: box size in voxels ``(h, w, d)``.
        orientation: flips and 90-degree rotations of the output cube.
        out_size: edge of the output cube, in voxels.
        intensity: one of :data:`INTENSITY_KINDS`, or None.
        gamma: exponent of the contrast transform.
        noise_std: standard deviation of the Gaussian noise (the field itself comes from the
            applying side's torch generator).
        histogram_steps: ``U[0, 1)`` per inner control point of the histogram shift
            (see :func:`histogram_control_points`).
        blur_sigma: per-axis sigmas of a Gaussian blur, or None.
        sharpen: the sharpening, or None (never both with ``blur_sigma``).
        gibbs_alpha: k-space truncation strength of Gibbs ringing, or None.
    """

    start: tuple[int, int, int]
    size: tuple[int, int, int]
    orientation: Orientation
    out_size: int
    intensity: str | None = None
    gamma: float = 1.0
    noise_std: float = 0.0
    histogram_steps: tuple[float, ...] = ()
    blur_sigma: tuple[float, float, float] | None = None
    sharpen: SharpenDraw | None = None
    gibbs_alpha: float | None = None


@dataclass(frozen=True)
class SampleDraw:
    """The crops of one sample: two global crops (teacher views) and ``N`` local crops."""

    global_crops: tuple[CropDraw, ...]
    local_crops: tuple[CropDraw, ...]

    def crops(self) -> tuple[CropDraw, ...]:
        """Global then local crops, the order in which they were drawn."""
        return self.global_crops + self.local_crops


def histogram_control_points(steps: Sequence[float], low: float, high: float) -> np.ndarray:
    """Moved control points of the histogram shift on the range ``[low, high]``.

    The ``len(steps) + 2`` reference points are equally spaced over ``[low, high]``; inner point
    ``i`` moves to ``left + (right - left) * steps[i - 1]`` between its already-moved left
    neighbour and its right neighbour (as MONAI's ``RandHistogramShift`` moves them, and exactly
    the float64 arithmetic of ``numpy``'s ``uniform(left, right)``). The ends stay fixed.

    Args:
        steps: ``U[0, 1)`` draws, one per inner point.
        low: lowest intensity of the crop.
        high: highest intensity of the crop.

    Returns:
        ``(len(steps) + 2,)`` float64 increasing control points.
    """
    moved = np.linspace(low, high, len(steps) + 2)
    for i, step in enumerate(steps, start=1):
        moved[i] = moved[i - 1] + (moved[i + 1] - moved[i - 1]) * step
    return moved


def _uniform3(rng: np.random.Generator, bounds: tuple[float, float]) -> tuple[float, float, float]:
    return tuple(float(s) for s in rng.uniform(bounds[0], bounds[1], size=3))  # type: ignore[return-value]


def _draw_intensity(settings: Any, rng: np.random.Generator) -> dict:
    """``intensity_prob``: one of contrast, noise, histogram shift, with its parameters."""
    if rng.random() >= settings.intensity_prob:
        return {}
    kind = INTENSITY_KINDS[int(rng.integers(0, 3))]
    if kind == "contrast":
        return {"intensity": kind, "gamma": float(rng.uniform(*settings.contrast_gamma))}
    if kind == "noise":
        return {"intensity": kind, "noise_std": float(rng.uniform(0.0, settings.noise_std))}
    steps = tuple(float(u) for u in rng.random(settings.histogram_shift_points - 2))
    return {"intensity": kind, "histogram_steps": steps}


def _draw_blur_or_sharpen(settings: Any, rng: np.random.Generator) -> dict:
    if rng.random() < settings.sharpen_prob:
        sigma1 = _uniform3(rng, settings.sharpen_sigma1)
        sigma2 = _uniform3(rng, settings.sharpen_sigma2)
        return {"sharpen": SharpenDraw(sigma1, sigma2, float(rng.uniform(*settings.sharpen_alpha)))}
    return {"blur_sigma": _uniform3(rng, settings.blur_sigma)}


def _draw_crop(settings: Any, rng: np.random.Generator, region_start: Sequence[int], region_shape: Sequence[int],
               out_size: int, area_scale: Sequence[float], depth_scale: Sequence[float]) -> dict:
    """Box (inside the region), orientation and intensity transform of one crop, as CropDraw fields."""
    size = sample_crop_size(rng, region_shape, area_scale, settings.aspect_ratio, depth_scale)
    start = sample_crop_start(rng, region_shape, size)
    orientation = sample_orientation(rng, settings.flip_prob, settings.rotate90_prob)
    absolute = tuple(int(r) + int(s) for r, s in zip(region_start, start))
    return {"start": absolute, "size": tuple(size), "orientation": orientation, "out_size": out_size,
            **_draw_intensity(settings, rng)}


def _draw_region(settings: Any, rng: np.random.Generator,
                 shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(start, size)`` of the sub-volume every crop of the sample comes from (the whole volume if off).

    On a few near-identical volumes, crops drawn from anywhere in the volume show unrelated
    anatomy, and the DINO objective (all crops of a sample share one target) can then only be met
    by telling volumes apart or by flat outputs. Drawing all crops of a sample from one random
    region makes their shared content a place in the anatomy.
    """
    if settings.region_scale is None:
        return (0, 0, 0), tuple(int(n) for n in shape)
    size = sample_crop_size(rng, shape, settings.region_scale, settings.aspect_ratio, settings.region_depth_scale)
    return sample_crop_start(rng, shape, size), size


def draw_sample(settings: Any, rng: np.random.Generator, shape: Sequence[int]) -> SampleDraw:
    """Draw every random parameter of one sample's crops.

    Args:
        settings: the augmentation's settings, a
            :class:`~dinov2.data.augmentations.DataAugmentationDINO3d` (its crop sizes, ranges and
            probabilities are read).
        rng: the sample's generator (reseeded by the loader from the sample's stream position).
        shape: spatial shape ``(H, W, D)`` of the volume the crops are cut from.

    Returns:
        The :class:`SampleDraw`; box corners are in voxels of the whole volume.
    """
    region_start, region_shape = _draw_region(settings, rng, shape)
    g, l = settings.global_crops_size, settings.local_crops_size
    global_crops = []
    for index in range(NUMBER_OF_GLOBAL_CROPS):
        fields = _draw_crop(settings, rng, region_start, region_shape, g, settings.global_crops_scale,
                            settings.global_crops_depth_scale)
        blur_prob = settings.global1_blur_prob if index == 0 else settings.global2_blur_prob
        if rng.random() < blur_prob:
            fields.update(_draw_blur_or_sharpen(settings, rng))
        if index > 0 and rng.random() < settings.global2_gibbs_prob:
            fields["gibbs_alpha"] = float(rng.uniform(*settings.gibbs_alpha))
        global_crops.append(CropDraw(**fields))
    local_crops = []
    for _ in range(settings.local_crops_number):
        fields = _draw_crop(settings, rng, region_start, region_shape, l, settings.local_crops_scale,
                            settings.local_crops_depth_scale)
        if rng.random() < settings.local_blur_prob:
            fields["blur_sigma"] = _uniform3(rng, settings.blur_sigma)
        local_crops.append(CropDraw(**fields))
    return SampleDraw(tuple(global_crops), tuple(local_crops))

