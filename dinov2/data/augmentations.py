"""DINO multi-crop augmentation for 3D volumes, on plain tensors and its own random generators.

One call turns a preprocessed volume ``(C, X, Y, Z)`` into two global and ``N`` local crops. It is
written for speed on CPU data-loading workers (see ``scripts/benchmark_data.py``): each crop is one
fused resampling of the sub-volume it needs (:func:`dinov2.data.crops.resized_crop`), and the
intensity transforms below act in place on the small output cubes. They follow MONAI's array
transforms of the same names (``RandAdjustContrast``, ``RandGaussianNoise``,
``RandHistogramShift``, ``RandGaussianSmooth``, ``RandGaussianSharpen``, ``RandGibbsNoise``)
where noted, without MetaTensor bookkeeping.

All randomness comes from the instance's ``numpy.random.Generator`` (parameters, drawn by
:func:`dinov2.data.augment_draws.draw_sample`, the one place every parameter is drawn) and
``torch.Generator`` (noise fields), which :meth:`DataAugmentationDINO3d.reseed` resets; a data
loader worker reseeds them from its own seed stream (``dinov2.data.seeding``), so two workers
never repeat each other's augmentations. With ``augment_on_device`` the instance only draws and
cuts (:mod:`dinov2.data.crop_boxes`), and :mod:`dinov2.data.device_augment` applies the same
draws batched on the training device.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from dinov2.data.augment_draws import NUMBER_OF_GLOBAL_CROPS, CropDraw, draw_sample, histogram_control_points
from dinov2.data.crop_boxes import cut_crop_boxes
from dinov2.data.crops import check_range, resized_crop
from dinov2.data.seeding import child_sequence

# ---------------------------------------------------------------------------------------------
# Intensity transforms on plain tensors. Each takes a (C, X, Y, Z) float32 tensor it may modify
# in place (the crops are fresh copies) and returns the result.
# ---------------------------------------------------------------------------------------------


def _affine_(x: torch.Tensor, scale: float, offset: float) -> torch.Tensor:
    """``x = scale * x + offset`` in place, in one pass over memory (``add`` with ``alpha``)."""
    return torch.add(torch.tensor(offset, dtype=x.dtype), x, alpha=scale, out=x)


def adjust_contrast_(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Gamma contrast on the crop's own range, as MONAI's ``AdjustContrast``.

    ``y = ((x - min) / (max - min + 1e-7)) ** gamma * (max - min) + min``.

    Args:
        x: ``(C, X, Y, Z)`` tensor, modified in place.
        gamma: exponent (> 0).

    Returns:
        ``x`` after the transform.
    """
    low, high = (float(v) for v in torch.aminmax(x))
    span = high - low
    # exp(gamma * log t) is about twice as fast as pow_ with a non-integer exponent on CPU
    # (pow falls back to scalar code); log(0) = -inf maps to exp(-inf) = 0 as 0 ** gamma does.
    # sub_ first (not a fused affine): the minimum must map to exactly 0, a rounding error
    # below 0 would turn into NaN in the log.
    x.sub_(low).mul_(1.0 / (span + 1e-7)).log_().mul_(gamma).exp_()
    return _affine_(x, span, low)


def add_gaussian_noise_(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Add zero-mean Gaussian noise of standard deviation ``std``.

    Args:
        x: ``(C, X, Y, Z)`` tensor, modified in place.
        std: noise standard deviation (intensity units of ``x``).
        generator: source of the noise field.

    Returns:
        ``x`` after the transform.
    """
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x.add_(noise, alpha=std)


def histogram_shift_(x: torch.Tensor, steps: Sequence[float]) -> torch.Tensor:
    """Piecewise-linear intensity remapping with randomly moved control points.

    As MONAI's ``RandHistogramShift``: ``len(steps) + 2`` reference points equally spaced over
    ``[min, max]`` of the crop; the inner ones are moved in turn, each between its already-moved
    left neighbour and its right neighbour by the fraction ``steps[i]``
    (:func:`~dinov2.data.augment_draws.histogram_control_points`); intensities are mapped
    linearly between matching points. The ends stay fixed, so the range is preserved.

    Args:
        x: ``(C, X, Y, Z)`` tensor, overwritten (used as scratch space).
        steps: ``U[0, 1)`` draws, one per inner control point (at least one).

    Returns:
        A new ``(C, X, Y, Z)`` remapped tensor (``x`` itself when its range is empty).
    """
    low, high = (float(v) for v in torch.aminmax(x))
    if high <= low:
        return x
    num_points = len(steps) + 2
    moved = histogram_control_points(steps, low, high)
    # Reference points are equally spaced, so the segment index is arithmetic (no bucketize),
    # and on segment k the map is intercept[k] + position * slope[k] with position in [k, k + 1].
    scale = (num_points - 1) / (high - low)
    position = _affine_(x, scale, -low * scale)
    segment = position.to(torch.int32).clamp_(max=num_points - 2).view(-1)
    table = torch.from_numpy(moved.astype(np.float32))
    slope = table[1:] - table[:-1]
    intercept = table[:-1] - torch.arange(num_points - 1, dtype=torch.float32) * slope
    values = intercept.index_select(0, segment).view_as(position)
    return values.addcmul_(position, slope.index_select(0, segment).view_as(position))


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised sampled Gaussian, truncated at ``ceil(3 * sigma)`` voxels each side.

    Args:
        sigma: standard deviation in voxels (> 0).

    Returns:
        ``(2r + 1,)`` float32 weights summing to one.
    """
    return torch.tensor(_gaussian_weights(sigma), dtype=torch.float32)


def gaussian_radius(sigma: float) -> int:
    """Half-width of the sampled Gaussian of standard deviation ``sigma``: ``max(1, ceil(3 sigma))`` voxels."""
    return max(1, math.ceil(3.0 * sigma))


def _gaussian_weights(sigma: float) -> list[float]:
    # Plain Python: for these few taps tensor ops would cost more than the arithmetic.
    radius = gaussian_radius(sigma)
    weights = [math.exp(-0.5 * (k / sigma) ** 2) for k in range(-radius, radius + 1)]
    total = sum(weights)
    return [w / total for w in weights]


def _filter_axis(x: torch.Tensor, dim: int, weights: Sequence[float]) -> torch.Tensor:
    """Correlate ``x`` with a 1D kernel along ``dim``, edges replicated (same size output)."""
    radius = (len(weights) - 1) // 2
    n = x.shape[dim]
    pad_shape = list(x.shape)
    pad_shape[dim] = radius
    padded = torch.cat(
        [x.narrow(dim, 0, 1).expand(pad_shape), x, x.narrow(dim, n - 1, 1).expand(pad_shape)], dim
    )
    # Shifted multiply-adds beat conv1d/conv3d for these short kernels on CPU by 5-10x.
    out = padded.narrow(dim, 0, n) * weights[0]
    for j in range(1, len(weights)):
        out.add_(padded.narrow(dim, j, n), alpha=weights[j])
    return out


def gaussian_blur(x: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian smoothing with one sigma per spatial axis (replicated edges).

    Args:
        x: ``(C, X, Y, Z)`` tensor (not modified).
        sigma: three standard deviations in voxels, one per spatial axis.

    Returns:
        ``(C, X, Y, Z)`` smoothed tensor.
    """
    out = x
    for axis, s in enumerate(sigma):
        out = _filter_axis(out, 1 + axis, _gaussian_weights(s))
    return out


def gaussian_sharpen(x: torch.Tensor, sigma1: Sequence[float], sigma2: Sequence[float], alpha: float) -> torch.Tensor:
    """Unsharp masking, as MONAI's ``GaussianSharpen``.

    ``b1 = G(sigma1) x``, ``b2 = G(sigma2) b1``, result ``b1 + alpha * (b1 - b2)``.

    Args:
        x: ``(C, X, Y, Z)`` tensor (not modified).
        sigma1: per-axis sigmas of the first smoothing.
        sigma2: per-axis sigmas of the second smoothing.
        alpha: weight of the high-pass term.

    Returns:
        ``(C, X, Y, Z)`` sharpened tensor.
    """
    blurred = gaussian_blur(x, sigma1)
    detail = blurred - gaussian_blur(blurred, sigma2)
    return blurred.add_(detail, alpha=alpha)


def gibbs_ringing(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Gibbs ringing by truncating k-space to a centred ball, as MONAI's ``GibbsNoise``.

    Frequencies are kept when ``sum_i (f_i / f_nyquist)^2 <= (1 - alpha)^2``: ``alpha = 0``
    keeps the ball inscribed in k-space (removing only its corners), ``alpha -> 1`` keeps only
    the mean.

    Args:
        x: ``(C, X, Y, Z)`` tensor (not modified).
        alpha: truncation strength in ``[0, 1]``.

    Returns:
        ``(C, X, Y, Z)`` real tensor.
    """
    shape = x.shape[-3:]
    spectrum = torch.fft.rfftn(x, dim=(-3, -2, -1))
    f0 = (torch.fft.fftfreq(shape[0]) * 2.0) ** 2
    f1 = (torch.fft.fftfreq(shape[1]) * 2.0) ** 2
    f2 = (torch.fft.rfftfreq(shape[2]) * 2.0) ** 2
    radius2 = f0[:, None, None] + f1[None, :, None] + f2[None, None, :]
    spectrum *= radius2 <= (1.0 - alpha) ** 2
    return torch.fft.irfftn(spectrum, s=shape, dim=(-3, -2, -1))


# ---------------------------------------------------------------------------------------------
# The multi-crop augmentation.
# ---------------------------------------------------------------------------------------------

def apply_crop_draw(volume: torch.Tensor, draw: CropDraw, generator: torch.Generator | None,
                    origin: Sequence[int] = (0, 0, 0)) -> torch.Tensor:
    """Make one crop from its draws: resampled box, intensity transform, blur or sharpen, Gibbs.

    Args:
        volume: ``(C, H, W, D)`` plain tensor (read, never modified): the volume the draws were
            made for, or a box cut from it.
        draw: the crop's draws, box corners in voxels of the whole volume.
        generator: source of the Gaussian noise field when the crop gets noise (else unused).
        origin: voxel of the whole volume where ``volume`` starts (a cut box's corner).

    Returns:
        ``(C, S, S, S)`` float32 crop, ``S = draw.out_size``.
    """
    start = [s - o for s, o in zip(draw.start, origin)]
    x = resized_crop(volume, start, draw.size, draw.out_size, draw.orientation)
    if draw.intensity == "contrast":
        x = adjust_contrast_(x, draw.gamma)
    elif draw.intensity == "noise":
        x = add_gaussian_noise_(x, draw.noise_std, generator)
    elif draw.intensity == "histogram":
        x = histogram_shift_(x, draw.histogram_steps)
    if draw.sharpen is not None:
        x = gaussian_sharpen(x, draw.sharpen.sigma1, draw.sharpen.sigma2, draw.sharpen.alpha)
    elif draw.blur_sigma is not None:
        x = gaussian_blur(x, draw.blur_sigma)
    if draw.gibbs_alpha is not None:
        x = gibbs_ringing(x, draw.gibbs_alpha)
    return x


@contextlib.contextmanager
def single_thread():
    """Run torch ops on one thread inside the block, then restore the thread count.

    These tensors are too small for intra-op parallelism to pay: with the main process's thread
    pool (``num_workers=0``) a sample took 6-15x longer on a busy 2-core machine than with one
    thread. DataLoader workers already run single-threaded, so there this costs nothing.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class DataAugmentationDINO3d:
    """Two global and ``N`` local random-resized 3D crops with DINO-style augmentations.

    **What the crop scales are relative to.** The input is the preprocessed volume: intensity
    scaled, its in-plane axes first and its through-plane axis last
    (``dinov2.data.transforms``), and cropped to its foreground bounding box. For a volume of
    spatial shape ``(H, W, D)`` a crop covers an in-plane area ``h * w`` that is a fraction
    ``s ~ U(*_crops_scale)`` of ``H * W`` with aspect ratio ``h / w`` log-uniform in
    ``aspect_ratio``, and a through-plane length ``d`` that is a fraction ``t ~ U(*_crops_depth_scale)``
    of ``D`` (see :func:`dinov2.data.crops.sample_crop_size`), at a uniformly random position. The
    box is resized trilinearly to a cube of ``global_crops_size`` or ``local_crops_size`` voxels.

    **Per crop, in order:** random flip of each axis (``flip_prob`` each); random rotation by
    k x 90 degrees, k in {1, 2, 3}, in each of the three planes (``rotate90_prob`` each); with
    probability ``intensity_prob`` one of gamma contrast (``gamma ~ U(contrast_gamma)``),
    Gaussian noise (``std ~ U(0, noise_std)``) or histogram shift (``histogram_shift_points``
    control points), chosen uniformly. Then:

    * global crop 1: blurred or sharpened (sharpened with probability ``sharpen_prob``), with
      probability ``global1_blur_prob`` (1 by default);
    * global crop 2: the same with probability ``global2_blur_prob``, then Gibbs ringing
      (``alpha ~ U(gibbs_alpha)``) with probability ``global2_gibbs_prob``;
    * local crops: blurred with probability ``local_blur_prob``.

    Blur sigmas are drawn per axis, in voxels of the output cube: ``U(blur_sigma)`` for blurring;
    ``U(sharpen_sigma1)``, ``U(sharpen_sigma2)`` and weight ``U(sharpen_alpha)`` for sharpening
    (see :func:`gaussian_sharpen`).

    Args:
        global_crops_size: edge ``G`` of the global crops, in voxels.
        local_crops_size: edge ``L`` of the local crops, in voxels.
        local_crops_number: number of local crops (may be 0).
        global_crops_scale: ``(min, max)`` in-plane area fraction of global crops.
        global_crops_depth_scale: ``(min, max)`` through-plane length fraction of global crops.
        local_crops_scale: ``(min, max)`` in-plane area fraction of local crops.
        local_crops_depth_scale: ``(min, max)`` through-plane length fraction of local crops.
        aspect_ratio: ``(min, max)`` in-plane aspect ratio ``h / w``.
        flip_prob: probability of flipping each axis.
        rotate90_prob: probability of a 90-degree rotation in each plane.
        intensity_prob: probability of applying one intensity transform to a crop.
        contrast_gamma: ``(min, max)`` gamma of the contrast transform.
        noise_std: largest standard deviation of the Gaussian noise.
        histogram_shift_points: control points of the histogram shift (>= 3).
        global1_blur_prob: probability of blur/sharpen on the first global crop.
        global2_blur_prob: probability of blur/sharpen on the second global crop.
        global2_gibbs_prob: probability of Gibbs ringing on the second global crop.
        local_blur_prob: probability of blur on each local crop.
        sharpen_prob: probability that a global blur/sharpen event sharpens.
        blur_sigma: ``(min, max)`` Gaussian sigma of blurring, in output voxels.
        sharpen_sigma1: ``(min, max)`` first sigma of sharpening.
        sharpen_sigma2: ``(min, max)`` second sigma of sharpening.
        sharpen_alpha: ``(min, max)`` high-pass weight of sharpening.
        gibbs_alpha: ``(min, max)`` k-space truncation strength, within ``[0, 1]``.
        region_scale: ``(min, max)`` in-plane area fraction of the region all crops of a sample
            come from, or None (no region; set together with ``region_depth_scale``).
        region_depth_scale: ``(min, max)`` through-plane length fraction of that region.
        augment_on_device: only draw the parameters and cut one box per sample (a call then
            returns :func:`~dinov2.data.crop_boxes.cut_crop_boxes`' output); the crops are made
            batched on the training device by :mod:`dinov2.data.device_augment`.
        seed: seed of the generators until :meth:`reseed` is called (an int or a
            ``numpy.random.SeedSequence``).

    Example:
        >>> aug = DataAugmentationDINO3d(global_crops_size=32, local_crops_size=16, local_crops_number=2)
        >>> out = aug(torch.rand(1, 40, 40, 30))
        >>> out["global_crops"][0].shape, len(out["local_crops"])
        (torch.Size([1, 32, 32, 32]), 2)
    """

    def __init__(
        self,
        *,
        global_crops_size: int = 96,
        local_crops_size: int = 48,
        local_crops_number: int = 8,
        global_crops_scale: Sequence[float] = (0.48, 1.0),
        global_crops_depth_scale: Sequence[float] = (0.5, 1.0),
        local_crops_scale: Sequence[float] = (0.16, 0.48),
        local_crops_depth_scale: Sequence[float] = (0.2, 0.5),
        aspect_ratio: Sequence[float] = (0.9, 1.0 / 0.9),
        flip_prob: float = 0.3,
        rotate90_prob: float = 0.3,
        intensity_prob: float = 0.8,
        contrast_gamma: Sequence[float] = (0.5, 2.0),
        noise_std: float = 0.002,
        histogram_shift_points: int = 10,
        global1_blur_prob: float = 1.0,
        global2_blur_prob: float = 0.1,
        global2_gibbs_prob: float = 0.2,
        local_blur_prob: float = 0.5,
        sharpen_prob: float = 0.5,
        blur_sigma: Sequence[float] = (0.25, 1.5),
        sharpen_sigma1: Sequence[float] = (0.5, 1.0),
        sharpen_sigma2: Sequence[float] = (0.5, 1.0),
        sharpen_alpha: Sequence[float] = (10.0, 30.0),
        gibbs_alpha: Sequence[float] = (0.0, 0.8),
        region_scale: Sequence[float] | None = None,
        region_depth_scale: Sequence[float] | None = None,
        augment_on_device: bool = False,
        seed: int | np.random.SeedSequence = 0,
    ) -> None:
        self._set_sizes(global_crops_size, local_crops_size, local_crops_number, histogram_shift_points, noise_std)
        self._set_crop_ranges(global_crops_scale, global_crops_depth_scale, local_crops_scale,
                              local_crops_depth_scale, aspect_ratio, region_scale, region_depth_scale)
        self.contrast_gamma = check_range("contrast_gamma", contrast_gamma, 1e-6)
        self.blur_sigma = check_range("blur_sigma", blur_sigma, 1e-6)
        self.sharpen_sigma1 = check_range("sharpen_sigma1", sharpen_sigma1, 1e-6)
        self.sharpen_sigma2 = check_range("sharpen_sigma2", sharpen_sigma2, 1e-6)
        self.sharpen_alpha = check_range("sharpen_alpha", sharpen_alpha, 0.0)
        self.gibbs_alpha = check_range("gibbs_alpha", gibbs_alpha, 0.0, 1.0)
        self._set_probabilities(
            flip_prob=flip_prob,
            rotate90_prob=rotate90_prob,
            intensity_prob=intensity_prob,
            global1_blur_prob=global1_blur_prob,
            global2_blur_prob=global2_blur_prob,
            global2_gibbs_prob=global2_gibbs_prob,
            local_blur_prob=local_blur_prob,
            sharpen_prob=sharpen_prob,
        )
        if not isinstance(augment_on_device, (bool, np.bool_)):
            raise ValueError(f"augment_on_device must be true or false, got {augment_on_device!r}.")
        self.augment_on_device = bool(augment_on_device)
        self.rng = np.random.default_rng()
        self.torch_generator = torch.Generator()
        self.reseed(seed)

    def _set_sizes(self, global_crops_size: int, local_crops_size: int, local_crops_number: int,
                   histogram_shift_points: int, noise_std: float) -> None:
        """Checks and stores the crop edges, the number of local crops and the scalar intensity settings."""
        for name, value in (("global_crops_size", global_crops_size), ("local_crops_size", local_crops_size)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer number of voxels, got {value!r}.")
        if int(local_crops_number) != local_crops_number or local_crops_number < 0:
            raise ValueError(f"local_crops_number must be a non-negative integer, got {local_crops_number!r}.")
        if int(histogram_shift_points) != histogram_shift_points or histogram_shift_points < 3:
            raise ValueError(f"histogram_shift_points must be an integer >= 3, got {histogram_shift_points!r}.")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std!r}.")
        self.global_crops_size = int(global_crops_size)
        self.local_crops_size = int(local_crops_size)
        self.local_crops_number = int(local_crops_number)
        self.noise_std = float(noise_std)
        self.histogram_shift_points = int(histogram_shift_points)

    def _set_crop_ranges(self, global_crops_scale: Sequence[float], global_crops_depth_scale: Sequence[float],
                         local_crops_scale: Sequence[float], local_crops_depth_scale: Sequence[float],
                         aspect_ratio: Sequence[float], region_scale: Sequence[float] | None,
                         region_depth_scale: Sequence[float] | None) -> None:
        """Checks and stores the ``(min, max)`` area / depth fractions and aspect ratios of the crop boxes."""
        self.global_crops_scale = _check_fraction_range("global_crops_scale", global_crops_scale)
        self.global_crops_depth_scale = _check_fraction_range("global_crops_depth_scale", global_crops_depth_scale)
        self.local_crops_scale = _check_fraction_range("local_crops_scale", local_crops_scale)
        self.local_crops_depth_scale = _check_fraction_range("local_crops_depth_scale", local_crops_depth_scale)
        self.aspect_ratio = check_range("aspect_ratio", aspect_ratio, 1e-6)
        if (region_scale is None) != (region_depth_scale is None):
            raise ValueError("region_scale and region_depth_scale must be set together (or both null), got "
                             f"{region_scale!r} and {region_depth_scale!r}.")
        self.region_scale = None if region_scale is None else _check_fraction_range("region_scale", region_scale)
        self.region_depth_scale = (None if region_depth_scale is None
                                   else _check_fraction_range("region_depth_scale", region_depth_scale))

    def _set_probabilities(self, **probabilities: float) -> None:
        """Checks that each keyword is a probability in [0, 1] and stores it as a float attribute of that name."""
        for name, p in probabilities.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}.")
            setattr(self, name, float(p))

    @classmethod
    def from_config(cls, crops: Mapping[str, Any], seed: int | np.random.SeedSequence = 0) -> "DataAugmentationDINO3d":
        """Build from the ``crops:`` section of the training config.

        Args:
            crops: mapping (dict or DictConfig) whose keys are this class's keyword arguments;
                missing keys take the packaged defaults (``dinov2/configs/data_defaults.yaml``).
            seed: initial seed of the generators.

        Returns:
            The augmentation.
        """
        from dinov2.data.transforms import load_data_defaults  # local: transforms imports MONAI

        defaults = dict(load_data_defaults()["crops"])
        unknown = sorted(set(crops) - set(defaults))
        if unknown:
            raise ValueError(
                f"Unknown key(s) in the crops config: {', '.join(unknown)}. Valid keys: {', '.join(sorted(defaults))}."
            )
        merged = {**defaults, **{k: crops[k] for k in crops}}
        kwargs = {k: (list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v) for k, v in merged.items()}
        return cls(**kwargs, seed=seed)

    def reseed(self, seed: int | np.random.SeedSequence) -> None:
        """Reset both generators from one seed (int or ``numpy.random.SeedSequence``)."""
        sequence = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(int(seed))
        numpy_seq, torch_seq = child_sequence(sequence, 0), child_sequence(sequence, 1)
        self.rng = np.random.Generator(np.random.PCG64(numpy_seq))
        self.torch_generator.manual_seed(int(torch_seq.generate_state(1, dtype=np.uint64)[0]))

    # -- the sample ----------------------------------------------------------------------------

    def __call__(self, volume: torch.Tensor) -> dict[str, Any]:
        """Make the crops of one sample (with ``augment_on_device``: draw them and cut their box).

        Args:
            volume: ``(C, H, W, D)`` plain tensor (float32 or float16), in-plane axes first,
                through-plane axis last. It is read, never modified.

        Returns:
            ``{"global_crops": [Tensor(C, G, G, G)] * 2, "local_crops": [Tensor(C, L, L, L)] * N}``,
            contiguous float32 tensors; with ``augment_on_device``, ``{"crop_boxes": CutSample}``
            (:func:`dinov2.data.crop_boxes.cut_crop_boxes`).
        """
        if not isinstance(volume, torch.Tensor) or volume.dim() != 4:
            raise ValueError(
                f"DataAugmentationDINO3d expects a (C, H, W, D) tensor, got {type(volume).__name__} "
                f"of shape {tuple(getattr(volume, 'shape', ()))}."
            )
        volume = volume.as_subclass(torch.Tensor)  # MetaTensor bookkeeping would slow every op
        if self.augment_on_device:
            return cut_crop_boxes(volume, draw_sample(self, self.rng, volume.shape[1:]), self.torch_generator)
        with single_thread():
            return self._make_crops(volume)

    def _make_crops(self, volume: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        draw = draw_sample(self, self.rng, volume.shape[1:])
        make = lambda crop: apply_crop_draw(volume, crop, self.torch_generator)  # noqa: E731
        return {"global_crops": [make(c) for c in draw.global_crops],
                "local_crops": [make(c) for c in draw.local_crops]}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global {NUMBER_OF_GLOBAL_CROPS} x {self.global_crops_size}^3 "
            f"scale {self.global_crops_scale} depth {self.global_crops_depth_scale}, local "
            f"{self.local_crops_number} x {self.local_crops_size}^3 scale {self.local_crops_scale} "
            f"depth {self.local_crops_depth_scale})"
        )


def _check_fraction_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    low, high = check_range(name, value, 0.0, 1.0)
    if low <= 0.0:
        raise ValueError(f"{name} must be a fraction range within (0, 1], got {value!r}.")
    return low, high
