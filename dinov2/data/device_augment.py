"""The DINO 3D crops of a batch of cut boxes, made batched on the training device.

With ``crops.augment_on_device`` a data-loader worker only draws each sample's parameters and
cuts one box (:mod:`dinov2.data.crop_boxes`); :func:`make_crops` then makes every crop of the
batch where the model runs. The parameters are the very draws the per-sample pipeline would
apply (:func:`dinov2.data.augment_draws.draw_sample`), so both paths have the same
distributions, and every crop depends only on its own sample's draws (exact resume, any batch
composition).

Two ways to apply them:

* accelerators, vectorised: per sample one ``grid_sample`` resamples all its crops of a group
  (crop box, trilinear resize, flips and 90-degree rotations fused into the sampling grid);
  contrast, histogram shift, blur / sharpen (separable filters with per-crop weights) and Gibbs
  ringing (one batched FFT) act on all crops of a group at once;
* CPU, crop by crop: the per-sample pipeline's kernels
  (:func:`dinov2.data.augmentations.apply_crop_draw`), which give the per-sample pipeline's
  crops bit for bit and, on one core, run about 4x faster than the vectorised forms at the
  recipe's crop sizes (``scripts/benchmark_device_augment.py`` measures both).

Nothing here reads a device tensor back to the host: every size and subset is known from the
host-side parameter arrays, which are copied to the device (``non_blocking``) and used there.
Gaussian noise fields come from one generator per noisy crop on the device, seeded with the
crop's own seed, so they too depend on nothing but the sample.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dinov2.data.augmentations import apply_crop_draw, gaussian_radius, single_thread

_DIMS = (1, 2, 3, 4)  # the (C, X, Y, Z) axes of a (N, C, X, Y, Z) batch of crops


def make_crops(crop_boxes: Mapping[str, Any], device: torch.device | str,
               vectorised: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The global and local crops of a batch collated by :func:`dinov2.data.crop_boxes.collate_crop_boxes`.

    Args:
        crop_boxes: the batch's ``"crop_boxes"`` dict: boxes on the CPU (pinned or not) or
            already on ``device``, parameters as host arrays.
        device: where to make the crops.
        vectorised: force the vectorised form (True) or the per-crop kernels (False); None picks
            per-crop kernels on the CPU and the vectorised form elsewhere.

    Returns:
        ``(global_crops (2B, C, G, G, G), local_crops (N_local * B, C, L, L, L) or None)``,
        float32 on ``device``, crop-major (row ``i * B + b`` is crop ``i`` of sample ``b``), as
        :func:`dinov2.data.collate.collate_data_and_cast` stacks them.
    """
    device = torch.device(device)
    boxes = _boxes_on(crop_boxes, device)
    if vectorised is None:
        vectorised = device.type != "cpu"
    with torch.no_grad():
        if not vectorised:
            with single_thread():
                return _per_crop(boxes, crop_boxes)
        return tuple(None if crop_boxes[key] is None else augment_group(boxes, crop_boxes[key])
                     for key in ("global", "local"))  # type: ignore[return-value]


def _boxes_on(crop_boxes: Mapping[str, Any], device: torch.device) -> list[torch.Tensor]:
    """The batch's boxes as float32 ``(C, bx, by, bz)`` tensors on ``device`` (CPU views stay views)."""
    return [box.to(device, non_blocking=True).to(torch.float32) for box in crop_boxes["boxes"]]


def _per_crop(boxes: Sequence[torch.Tensor], crop_boxes: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every crop made by the per-sample pipeline's kernels, stacked crop-major per group.

    Sample by sample (as a worker would make them), which keeps a sample's box in the caches
    while its crops are read from it.
    """
    draws, seeds, origins = crop_boxes["draws"], crop_boxes["noise_seeds"], crop_boxes["origins"]
    n_samples = len(draws)
    crops: list[list] = [[None] * n_samples * len(draws[0].global_crops),
                         [None] * n_samples * len(draws[0].local_crops)]
    for b, (box, draw) in enumerate(zip(boxes, draws)):
        for c, crop in enumerate(draw.crops()):
            generator = None
            if crop.intensity == "noise":
                generator = torch.Generator(device=box.device).manual_seed(int(seeds[b][c]))
            group, i = (0, c) if c < len(draw.global_crops) else (1, c - len(draw.global_crops))
            crops[group][i * n_samples + b] = apply_crop_draw(box, crop, generator, origins[b])
    return torch.stack(crops[0]), torch.stack(crops[1]) if crops[1] else None


def augment_group(boxes: Sequence[torch.Tensor], group: Mapping[str, Any]) -> torch.Tensor:
    """All crops of one group (global or local), vectorised over the group.

    Args:
        boxes: ``B`` float32 ``(C, bx, by, bz)`` boxes on the target device.
        group: the group's host arrays (:func:`dinov2.data.crop_boxes.collate_crop_boxes`).

    Returns:
        ``(K * B, C, S, S, S)`` float32 crops on the boxes' device, crop-major.
    """
    x = resample_group(boxes, group)
    rows = lambda name: _on(group[f"{name}_rows"], x.device)  # noqa: E731
    on = lambda name: _on(group[name], x.device)  # noqa: E731
    if len(group["contrast_rows"]):
        _update_rows_(x, rows("contrast"), lambda y: adjust_contrast_batch_(y, on("gamma")))
    if len(group["noise_rows"]):
        _update_rows_(x, rows("noise"), lambda y: add_noise_batch_(y, on("noise_std"), group["noise_seed"].tolist()))
    if len(group["histogram_rows"]):
        _update_rows_(x, rows("histogram"), lambda y: histogram_shift_batch(y, on("histogram_points")))
    if len(group["blur_rows"]):
        radius = _radius(group["blur_sigma"])
        _update_rows_(x, rows("blur"), lambda y: gaussian_blur_batch(y, on("blur_sigma"), radius))
    if len(group["sharpen_rows"]):
        radius = _radius(np.concatenate([group["sharpen_sigma1"], group["sharpen_sigma2"]]))
        _update_rows_(x, rows("sharpen"), lambda y: gaussian_sharpen_batch(
            y, on("sharpen_sigma1"), on("sharpen_sigma2"), on("sharpen_alpha"), radius))
    if len(group["gibbs_rows"]):
        _update_rows_(x, rows("gibbs"), lambda y: gibbs_ringing_batch(y, on("gibbs_alpha")))
    return x


def _on(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on ``device`` (an asynchronous copy where the device allows)."""
    return torch.from_numpy(values).to(device, non_blocking=True)


def _radius(sigmas: np.ndarray) -> int:
    """The widest Gaussian half-width of a set of host sigmas (no device sync)."""
    return gaussian_radius(float(sigmas.max()))


def _update_rows_(x: torch.Tensor, rows: torch.Tensor, transform) -> None:
    """``x[rows] = transform(x[rows])`` without boolean masks (no host sync on any device)."""
    x.index_copy_(0, rows, transform(x.index_select(0, rows)))


# ---------------------------------------------------------------------------------------------
# Geometry: crop box + trilinear resize + flips + 90-degree rotations, one grid_sample per sample.
# ---------------------------------------------------------------------------------------------


def resample_group(boxes: Sequence[torch.Tensor], group: Mapping[str, Any]) -> torch.Tensor:
    """Resample every crop of a group from its sample's box.

    Sampling positions are those of ``F.interpolate(mode="trilinear", align_corners=False)`` on
    the crop's box (so the result equals :func:`dinov2.data.crops.resized_crop` to float
    rounding), oriented by permuting and reversing the per-axis coordinates. One
    ``grid_sample`` per sample reads that sample's box only, with coordinates normalised by the
    box's own size: a crop's values do not depend on the other samples of the batch.

    Args:
        boxes: ``B`` float32 ``(C, bx, by, bz)`` boxes on one device.
        group: the group's host arrays (``size``, ``samples``, ``sample``, ``start``, ``extent``,
            ``axes``, ``flipped``).

    Returns:
        ``(K * B, C, S, S, S)`` float32, crop-major.
    """
    size, n_samples = int(group["size"]), int(group["samples"])
    device, channels = boxes[0].device, boxes[0].shape[0]
    n_crops = group["start"].shape[0] // n_samples
    box_sizes = np.array([list(b.shape[1:]) for b in boxes], dtype=np.float32)[group["sample"]]
    coords = _oriented_coordinates(group, box_sizes, size, device).view(n_crops, n_samples, 3, size)
    # Grid channel c is input axis 2 - c (grid_sample wants (z, y, x)); that axis runs along the
    # output axis inverse[a] of each crop.
    channel_axes = _on(np.ascontiguousarray(group["axes"].argsort(axis=1)[:, ::-1]), device).view(n_crops, n_samples, 3)
    out = torch.empty((n_crops, n_samples, channels, size, size, size), dtype=torch.float32, device=device)
    for b, box in enumerate(boxes):
        grid = _grid(coords[:, b], channel_axes[:, b]).view(1, n_crops * size, size, size, 3)
        sampled = F.grid_sample(box[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
        out[:, b] = sampled[0].view(channels, n_crops, size, size, size).transpose(0, 1)
    return out.view(n_crops * n_samples, channels, size, size, size)


def _oriented_coordinates(group: Mapping[str, Any], box_sizes: np.ndarray, size: int,
                          device: torch.device) -> torch.Tensor:
    """``(N, 3, S)``: for each crop and output axis ``j``, the normalised ``grid_sample`` coordinate
    (of input axis ``axes[j]``) at each output index along ``j``."""
    start = _on(group["start"].astype(np.float32), device)
    extent = _on(group["extent"].astype(np.float32), device)
    box_sizes = _on(box_sizes, device)
    # F.interpolate's source index for align_corners=False: scale * (i + 0.5) - 0.5, clamped to
    # the box (its upper neighbour is clamped too, which keeps every sample inside the box).
    index = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    source = (index * (extent / size)[..., None] - 0.5).clamp_(min=0)
    source = torch.minimum(source, (extent - 1)[..., None])
    normalised = (2 * (start[..., None] + source) + 1) / box_sizes[..., None] - 1
    axes = _on(group["axes"], device)
    flipped = _on(group["flipped"], device)
    oriented = normalised.gather(1, axes[..., None].expand(-1, -1, size))
    positions = torch.arange(size, device=device)
    return oriented.gather(2, torch.where(flipped[..., None], size - 1 - positions, positions))


def _grid(coords: torch.Tensor, channel_axes: torch.Tensor) -> torch.Tensor:
    """``(K, S, S, S, 3)`` sampling grid from ``(K, 3, S)`` per-output-axis coordinates.

    ``channel_axes[k, c]`` is the output axis along which grid channel ``c`` varies.
    """
    k, _, s = coords.shape
    fields = torch.stack([coords[:, 0].view(k, s, 1, 1).expand(k, s, s, s),
                          coords[:, 1].view(k, 1, s, 1).expand(k, s, s, s),
                          coords[:, 2].view(k, 1, 1, s).expand(k, s, s, s)], dim=-1)
    return fields.gather(-1, channel_axes.view(k, 1, 1, 1, 3).expand(k, s, s, s, 3))


# ---------------------------------------------------------------------------------------------
# Intensity, blur / sharpen and Gibbs ringing with per-crop parameters. Each takes a
# (n, C, S, S, S) float tensor (a fresh copy it may modify) and (n,)-shaped parameters on its device.
# ---------------------------------------------------------------------------------------------


def _per_crop_view(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1, 1)


def adjust_contrast_batch_(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Gamma contrast on each crop's own range (:func:`dinov2.data.augmentations.adjust_contrast_`).

    Args:
        x: ``(n, C, S, S, S)``, modified in place.
        gamma: ``(n,)`` exponents.
    """
    low, high = x.amin(dim=_DIMS, keepdim=True), x.amax(dim=_DIMS, keepdim=True)
    span = high - low
    # sub_ first: the minimum must map to exactly 0 (log(0) = -inf, exp(-inf) = 0), never below.
    x.sub_(low).mul_(1.0 / (span + 1e-7)).log_().mul_(_per_crop_view(gamma)).exp_()
    return x.mul_(span).add_(low)


def add_noise_batch_(x: torch.Tensor, std: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """Zero-mean Gaussian noise, the field of crop ``k`` drawn by a generator seeded with ``seeds[k]``.

    Args:
        x: ``(n, C, S, S, S)``, modified in place.
        std: ``(n,)`` standard deviations.
        seeds: ``n`` host integers (one generator each: the field depends on the crop alone).
    """
    noise = torch.empty_like(x)
    for k, seed in enumerate(seeds):
        noise[k].normal_(generator=torch.Generator(device=x.device).manual_seed(int(seed)))
    return x.addcmul_(noise, _per_crop_view(std))


def histogram_shift_batch(x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear remapping (:func:`dinov2.data.augmentations.histogram_shift_`) per crop.

    Args:
        x: ``(n, C, S, S, S)`` (not modified).
        points: ``(n, P)`` moved control points as fractions of each crop's range, ``[0, ..., 1]``.

    Returns:
        ``(n, C, S, S, S)``; a constant crop is returned unchanged.
    """
    n, n_points = points.shape
    flat = x.reshape(n, -1)
    low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    span = high - low
    table = low + span * points
    # Reference points are equally spaced: the segment of a value is arithmetic, and on segment
    # k the map is intercept[k] + position * slope[k].
    position = (flat - low) * ((n_points - 1) / span.clamp(min=torch.finfo(x.dtype).tiny))
    segment = position.to(torch.int64).clamp_(0, n_points - 2)
    slope = table[:, 1:] - table[:, :-1]
    intercept = table[:, :-1] - torch.arange(n_points - 1, device=x.device, dtype=x.dtype) * slope
    values = intercept.gather(1, segment).addcmul_(position, slope.gather(1, segment))
    return torch.where(span > 0, values, flat).view_as(x)


def gaussian_weights_batch(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """``(n, 2 * radius + 1)`` normalised Gaussians, each truncated at its own ``max(1, ceil(3 sigma))``.

    Zero taps pad every kernel to the common ``radius``, so a crop's weights are those of
    :func:`dinov2.data.augmentations.gaussian_kernel1d` for its sigma.
    """
    taps = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    weights = torch.exp(-0.5 * (taps / sigma[:, None]) ** 2)
    own_radius = torch.ceil(3.0 * sigma).clamp_(min=1.0)
    weights = weights * (taps.abs() <= own_radius[:, None])
    return weights / weights.sum(1, keepdim=True)


def _filter_axis_batch(x: torch.Tensor, dim: int, weights: torch.Tensor) -> torch.Tensor:
    """Correlate each crop with its own 1D kernel along ``dim``, edges replicated (same size)."""
    radius = (weights.shape[1] - 1) // 2
    n = x.shape[dim]
    pad_shape = list(x.shape)
    pad_shape[dim] = radius
    padded = torch.cat(
        [x.narrow(dim, 0, 1).expand(pad_shape), x, x.narrow(dim, n - 1, 1).expand(pad_shape)], dim
    )
    # Shifted multiply-adds: a per-crop kernel that a grouped convolution would need reshaping for.
    out = padded.narrow(dim, 0, n) * _per_crop_view(weights[:, 0])
    for j in range(1, weights.shape[1]):
        out.addcmul_(padded.narrow(dim, j, n), _per_crop_view(weights[:, j]))
    return out


def gaussian_blur_batch(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian smoothing, per crop and per axis sigmas (replicated edges).

    Args:
        x: ``(n, C, S, S, S)`` (not modified).
        sigma: ``(n, 3)`` standard deviations in voxels.
        radius: a half-width at least every crop's own (host int).
    """
    for axis in range(3):
        x = _filter_axis_batch(x, 2 + axis, gaussian_weights_batch(sigma[:, axis], radius))
    return x


def gaussian_sharpen_batch(x: torch.Tensor, sigma1: torch.Tensor, sigma2: torch.Tensor, alpha: torch.Tensor,
                           radius: int) -> torch.Tensor:
    """Unsharp masking per crop (:func:`dinov2.data.augmentations.gaussian_sharpen`).

    Args:
        x: ``(n, C, S, S, S)`` (not modified).
        sigma1, sigma2: ``(n, 3)`` sigmas of the two smoothings.
        alpha: ``(n,)`` weights of the high-pass term.
        radius: a half-width at least every crop's own (host int).
    """
    blurred = gaussian_blur_batch(x, sigma1, radius)
    detail = blurred - gaussian_blur_batch(blurred, sigma2, radius)
    return blurred.addcmul_(detail, _per_crop_view(alpha))


def gibbs_ringing_batch(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Gibbs ringing per crop (:func:`dinov2.data.augmentations.gibbs_ringing`): one batched FFT.

    Args:
        x: ``(n, C, X, Y, Z)`` (not modified).
        alpha: ``(n,)`` truncation strengths in ``[0, 1]``.
    """
    shape = x.shape[-3:]
    spectrum = torch.fft.rfftn(x, dim=(-3, -2, -1))
    f0 = (torch.fft.fftfreq(shape[0], device=x.device) * 2.0) ** 2
    f1 = (torch.fft.fftfreq(shape[1], device=x.device) * 2.0) ** 2
    f2 = (torch.fft.rfftfreq(shape[2], device=x.device) * 2.0) ** 2
    radius2 = f0[:, None, None] + f1[None, :, None] + f2[None, None, :]
    keep = radius2[None] <= ((1.0 - alpha) ** 2).view(-1, 1, 1, 1)
    spectrum *= keep[:, None]
    return torch.fft.irfftn(spectrum, s=shape, dim=(-3, -2, -1)).to(x.dtype)
