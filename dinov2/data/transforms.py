"""Deterministic preprocessing of pretraining volumes (the cacheable part) and the frame pick.

The chain built by :func:`build_preprocessing`, in order, on a dict with an ``"image"`` path:

1. :class:`~dinov2.data.validation.LoadVolumed` (MONAI's ``LoadImaged``, which picks the reader:
   nibabel for NIfTI, pydicom for DICOM; a file it cannot read, a 2D or 5D array is an
   ``InputVolumeError`` naming the file) and ``EnsureChannelFirstd``. A 4D series becomes ``(T, X, Y, Z)``, its frames on the channel axis;
   one frame is picked at random every time the volume is sampled (:func:`pick_frame`), after
   the cache, so caching never freezes the choice.
2. :class:`ReplaceNonFinited`: NaN and +-Inf become the finite minimum (or 0), with one warning
   naming the file and the count (a volume without any finite voxel is an error); then, if
   ``target_spacing`` is set, MONAI's ``Spacingd`` resamples (trilinear) to that voxel size, so
   a crop of N voxels covers the same millimetres in every volume of a mixed-resolution set.
3. :class:`ReorderAxesd`: the two in-plane axes (equal spacing) first, the odd one last
   (:func:`in_plane_axis_order`); the affine is permuted with the data.
4. Robust intensity scaling to ``[b_min, b_max]``: MONAI's ``ScaleIntensityRangePercentilesd``
   (default, percentiles 0.05 - 99.95, clipped) or ``ScaleIntensityRanged`` over a CT window.
5. Foreground crop: MONAI's ``CropForegroundd`` to the box of voxels above a threshold on the
   scaled intensity, so random crops do not sample empty air (:class:`RequireForegroundd`
   rejects blank volumes first).
6. :class:`ToStoraged`: a plain ``torch.Tensor`` of the storage dtype, so neither the cache nor the
   augmentation hot loop carries MetaTensor overhead.

The options live in the ``preprocessing:`` section of ``dinov2/configs/data_defaults.yaml``;
:func:`preprocessing_cache_key` hashes them so a changed option never reads a stale cache.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from functools import lru_cache
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    MapTransform,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)
from omegaconf import DictConfig, OmegaConf

from dinov2.data.readers import image_readers
from dinov2.data.validation import InputVolumeError, LoadVolumed, warn_nonfinite
from dinov2.utils.config import load_yaml, packaged_config_path

# Bump when the stored format or the meaning of a preprocessing option changes, so old disk
# caches are not read by new code.
CACHE_FORMAT_VERSION = 1

_INTENSITY_MODE_DEFAULTS = {"percentile": (0.05, 99.95), "ct_window": (-1000.0, 1000.0)}
_STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_CACHE_MODES = ("auto", "disk", "memory", "none")


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _data_defaults() -> DictConfig:
    return load_yaml(packaged_config_path("data_defaults"))


def load_data_defaults() -> DictConfig:
    """The packaged ``crops:`` and ``preprocessing:`` defaults (a fresh copy, safe to modify)."""
    return copy.deepcopy(_data_defaults())


def _as_dict(cfg: Mapping[str, Any] | DictConfig | None) -> dict:
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return copy.deepcopy(dict(cfg))


def _merge_checked(defaults: dict, given: dict, where: str) -> dict:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(
            f"Unknown key(s) in {where}: {', '.join(unknown)}. Valid keys: {', '.join(sorted(defaults))} "
            "(see dinov2/configs/data_defaults.yaml)."
        )
    out = dict(defaults)
    for key, value in given.items():
        if isinstance(defaults[key], dict):
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}.{key} must be a mapping, got {value!r}.")
            out[key] = _merge_checked(defaults[key], dict(value), f"{where}.{key}")
        else:
            out[key] = value
    return out


def resolve_preprocessing_config(cfg: Mapping[str, Any] | DictConfig | None = None) -> dict:
    """Merge a ``preprocessing:`` section over the packaged defaults and validate it.

    ``intensity.lower`` / ``intensity.upper`` left ``null`` take the mode's defaults
    (percentile 0.05 / 99.95; ct_window -1000 / 1000 HU), so the result is explicit.

    Args:
        cfg: the user's ``preprocessing`` mapping (dict or DictConfig), or None for defaults.

    Returns:
        A plain nested dict with every option set.
    """
    defaults = OmegaConf.to_container(_data_defaults()["preprocessing"], resolve=True)
    out = _merge_checked(defaults, _as_dict(cfg), "preprocessing")
    intensity = out["intensity"]
    mode = intensity["mode"]
    if mode not in _INTENSITY_MODE_DEFAULTS:
        raise ValueError(f"preprocessing.intensity.mode must be one of {sorted(_INTENSITY_MODE_DEFAULTS)}, got {mode!r}.")
    default_lower, default_upper = _INTENSITY_MODE_DEFAULTS[mode]
    intensity["lower"] = float(default_lower if intensity["lower"] is None else intensity["lower"])
    intensity["upper"] = float(default_upper if intensity["upper"] is None else intensity["upper"])
    if not intensity["lower"] < intensity["upper"]:
        raise ValueError(f"preprocessing.intensity needs lower < upper, got {intensity['lower']} and {intensity['upper']}.")
    if mode == "percentile" and not (0.0 <= intensity["lower"] and intensity["upper"] <= 100.0):
        raise ValueError(f"preprocessing.intensity percentiles must lie in [0, 100], got {intensity['lower']}, {intensity['upper']}.")
    if not float(intensity["b_min"]) < float(intensity["b_max"]):
        raise ValueError(f"preprocessing.intensity needs b_min < b_max, got {intensity['b_min']} and {intensity['b_max']}.")
    if out["nonfinite_fill"] not in ("min", "zero"):
        raise ValueError(f"preprocessing.nonfinite_fill must be 'min' or 'zero', got {out['nonfinite_fill']!r}.")
    if out["storage_dtype"] not in _STORAGE_DTYPES:
        raise ValueError(f"preprocessing.storage_dtype must be one of {sorted(_STORAGE_DTYPES)}, got {out['storage_dtype']!r}.")
    spacing = out["target_spacing"]
    if spacing is not None and (len(spacing) != 3 or not all(float(v) > 0 for v in spacing)):
        raise ValueError(f"preprocessing.target_spacing must be null or three positive sizes in mm, got {spacing!r}.")
    margin = out["foreground"]["margin"]
    if int(margin) != margin or margin < 0:
        raise ValueError(f"preprocessing.foreground.margin must be a non-negative integer, got {margin!r}.")
    cache = out["cache"]
    if cache["mode"] not in _CACHE_MODES:
        raise ValueError(f"preprocessing.cache.mode must be one of {list(_CACHE_MODES)}, got {cache['mode']!r}.")
    if cache["mode"] == "disk" and not cache["dir"]:
        raise ValueError("preprocessing.cache.mode is 'disk' but preprocessing.cache.dir is not set: give a folder.")
    return out


def preprocessing_cache_key(cfg: Mapping[str, Any] | DictConfig | None = None) -> str:
    """Hash of everything that changes the cached data (all options but ``cache``).

    Args:
        cfg: a ``preprocessing`` mapping (resolved or not).

    Returns:
        16 hex characters; equal configs (after resolving defaults) give equal keys.
    """
    resolved = resolve_preprocessing_config(cfg)
    resolved.pop("cache")
    payload = json.dumps({"format": CACHE_FORMAT_VERSION, "preprocessing": resolved}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Axis order
# ---------------------------------------------------------------------------------------------


def _odd_one_out(values: Sequence[float], close) -> int | None:
    """Index of the one value that differs while the other two agree, else None."""
    for odd in range(3):
        a, b = (i for i in range(3) if i != odd)
        if close(values[a], values[b]) and not close(values[odd], values[a]):
            return odd
    return None


def in_plane_axis_order(spacing: Sequence[float], shape: Sequence[int], rtol: float = 1e-3) -> tuple[int, int, int]:
    """Spatial axis permutation that puts the in-plane axes first and the odd axis last.

    The in-plane axes are the two with equal spacing (within ``rtol``). When all three spacings
    differ, the two closest (in ratio) are in-plane. When all are equal, the axis whose size
    differs from the two others is taken as the odd one; when that is ambiguous too (all sizes
    equal or all different), the order is kept.

    Args:
        spacing: voxel size per spatial axis, e.g. ``(0.7, 5.0, 0.7)``.
        shape: size per spatial axis.
        rtol: relative tolerance for equal spacings.

    Returns:
        ``perm`` such that ``volume.permute(0, *(1 + p for p in perm))`` is ordered; the in-plane
        axes keep their relative order. E.g. spacing ``(0.7, 5.0, 0.7)`` gives ``(0, 2, 1)``.
    """
    spacing = [float(s) for s in spacing]
    if len(spacing) != 3 or len(shape) != 3 or min(spacing) <= 0:
        raise ValueError(f"in_plane_axis_order needs 3 positive spacings and 3 sizes, got {spacing} and {list(shape)}.")

    def close(a: float, b: float) -> bool:
        return math.isclose(a, b, rel_tol=rtol)

    odd = _odd_one_out(spacing, close)
    if odd is None and all(close(spacing[0], s) for s in spacing[1:]):
        odd = _odd_one_out([int(n) for n in shape], lambda a, b: a == b)
    elif odd is None:
        # All spacings differ: the pair with the smallest log-ratio is in-plane.
        odd = min(range(3), key=lambda o: abs(math.log(spacing[(o + 1) % 3] / spacing[(o + 2) % 3])))
    if odd is None:
        return (0, 1, 2)
    return tuple(i for i in range(3) if i != odd) + (odd,)


# ---------------------------------------------------------------------------------------------
# Dictionary transforms
# ---------------------------------------------------------------------------------------------


def _source_name(x: Any) -> str:
    if isinstance(x, MetaTensor):
        return str(x.meta.get("filename_or_obj", "<in-memory image>"))
    return "<in-memory image>"


def _source_names(x: Any) -> list[str]:
    """The file(s) an image was read from: one per channel when modality files were stacked."""
    source = x.meta.get("filename_or_obj") if isinstance(x, MetaTensor) else None
    if isinstance(source, (list, tuple)) and source:
        return [str(s) for s in source]
    return [str(source) if source else "<in-memory image>"]


class ReplaceNonFinited(MapTransform):
    """Replace NaN and +-Inf by the finite minimum of the image (``fill="min"``) or by 0.

    One warning per file (and process) names the file and the count
    (:func:`dinov2.data.validation.warn_nonfinite`).

    Args:
        keys: image keys.
        fill: ``"min"`` or ``"zero"``.
        channel_wise: take the minimum of each channel (modalities stacked as channels differ in
            range) instead of the whole array (frames of one series share it).

    Raises:
        InputVolumeError: when the image (or a channel of it) has no finite value at all (names the file).
    """

    def __init__(self, keys: Hashable | Sequence[Hashable], fill: str = "min", channel_wise: bool = False) -> None:
        super().__init__(keys)
        if fill not in ("min", "zero"):
            raise ValueError(f"fill must be 'min' or 'zero', got {fill!r}.")
        self.fill = fill
        self.channel_wise = channel_wise

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            finite = torch.isfinite(x)
            if bool(finite.all()):
                continue
            sources = _source_names(x)
            parts = range(x.shape[0]) if self.channel_wise and x.dim() > 1 else [None]
            out = x
            for c in parts:
                part, ok = (x, finite) if c is None else (x[c], finite[c])
                source = sources[c] if c is not None and len(sources) == x.shape[0] else sources[0]
                if bool(ok.all()):
                    continue
                if not bool(ok.any()):
                    raise InputVolumeError(source, "no finite voxel (all NaN or +-Inf)",
                                           "export it again, or remove it from the datalist")
                value = float(part[ok].min()) if self.fill == "min" else 0.0
                bad = int(ok.numel() - ok.sum())
                what = f"the smallest finite value ({value:g})" if self.fill == "min" else "0"
                warn_nonfinite(source, bad, int(ok.numel()), what)
                filled = torch.where(ok, part, torch.as_tensor(value, dtype=x.dtype))
                if c is None:
                    out = filled
                else:
                    out = out.clone() if out is x else out
                    out[c] = filled
            d[key] = out
        return d


class ReorderAxesd(MapTransform):
    """Permute the spatial axes so the in-plane axes come first (see :func:`in_plane_axis_order`).

    Works on ``(C, X, Y, Z)`` MetaTensors; the spacing is read from the affine, and the affine's
    columns are permuted with the data so the image stays correctly placed in world space.
    """

    def __init__(self, keys: Hashable | Sequence[Hashable], rtol: float = 1e-3) -> None:
        super().__init__(keys)
        self.rtol = rtol

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            if not isinstance(x, MetaTensor) or x.dim() != 4:
                raise ValueError(
                    f"ReorderAxesd needs a (C, X, Y, Z) MetaTensor with an affine (from LoadImaged), got "
                    f"{type(x).__name__} of shape {tuple(x.shape)} from {_source_name(x)}."
                )
            spacing = [float(s) for s in x.pixdim[:3]]
            perm = in_plane_axis_order(spacing, x.shape[1:], self.rtol)
            if perm == (0, 1, 2):
                continue
            affine = x.affine.clone()
            out = x.permute(0, *(1 + p for p in perm)).contiguous()
            affine[:, :3] = affine[:, list(perm)]
            out.affine = affine
            d[key] = out
        return d


class ForegroundAbove:
    """Picklable ``select_fn`` for ``CropForegroundd``: voxels strictly above ``threshold``."""

    def __init__(self, threshold: float) -> None:
        self.threshold = float(threshold)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x > self.threshold


class RequireForegroundd(MapTransform):
    """Raise a clear error for a volume with no voxel above the foreground threshold."""

    def __init__(self, keys: Hashable | Sequence[Hashable], threshold: float) -> None:
        super().__init__(keys)
        self.threshold = float(threshold)

    def __call__(self, data: Mapping) -> dict:
        for key in self.key_iterator(data):
            x = data[key]
            if not bool((x > self.threshold).any()):
                raise ValueError(
                    f"{_source_name(x)}: no voxel above the foreground threshold {self.threshold} after intensity "
                    "scaling (blank image?). Remove it from the datalist or lower preprocessing.foreground.threshold."
                )
        return dict(data)


class ToStoraged(MapTransform):
    """Turn the preprocessed image into the cached record ``{"image", "spacing", "source"}``.

    ``image`` becomes a plain contiguous ``(T, H, W, D)`` tensor of ``dtype`` (T = frames, 1 for
    a 3D volume); ``spacing`` is its voxel size (after reordering) and ``source`` the file name.
    """

    def __init__(self, keys: Hashable | Sequence[Hashable], dtype: torch.dtype = torch.float32) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"ToStoraged stores one image key, got {self.keys}.")
        self.dtype = dtype

    def __call__(self, data: Mapping) -> dict:
        x = data[self.keys[0]]
        source = _source_name(x)
        if x.dim() != 4 or min(x.shape[1:]) < 1:
            raise ValueError(
                f"{source}: expected a 3D volume or a 4D series, got an array of shape {tuple(x.shape)} after "
                "preprocessing (channel first). Check the file."
            )
        spacing = [float(s) for s in x.pixdim[:3]] if isinstance(x, MetaTensor) else [1.0, 1.0, 1.0]
        image = x.as_subclass(torch.Tensor).to(self.dtype).contiguous()
        return {"image": image, "spacing": spacing, "source": source}


def build_preprocessing(cfg: Mapping[str, Any] | DictConfig | None = None, key: str = "image") -> Compose:
    """The deterministic (cacheable) preprocessing chain described in the module docstring.

    Args:
        cfg: ``preprocessing`` mapping (missing keys take the packaged defaults).
        key: key of the image path in the datalist entries.

    Returns:
        A MONAI ``Compose`` mapping ``{key: path, ...}`` to ``{"image": Tensor(T, H, W, D),
        "spacing": [3 floats], "source": str}``.
    """
    c = resolve_preprocessing_config(cfg)
    intensity = c["intensity"]
    transforms = [
        LoadVolumed(keys=key, reader=image_readers(), image_only=True, dtype=np.float32),
        EnsureChannelFirstd(keys=key),
        ReplaceNonFinited(keys=key, fill=c["nonfinite_fill"]),
    ]
    if c["target_spacing"] is not None:
        transforms.append(Spacingd(keys=key, pixdim=[float(v) for v in c["target_spacing"]], mode="bilinear"))
    if c["reorder_axes"]:
        transforms.append(ReorderAxesd(keys=key))
    if intensity["mode"] == "percentile":
        transforms.append(
            ScaleIntensityRangePercentilesd(
                keys=key,
                lower=intensity["lower"],
                upper=intensity["upper"],
                b_min=float(intensity["b_min"]),
                b_max=float(intensity["b_max"]),
                clip=bool(intensity["clip"]),
            )
        )
    else:
        transforms.append(
            ScaleIntensityRanged(
                keys=key,
                a_min=intensity["lower"],
                a_max=intensity["upper"],
                b_min=float(intensity["b_min"]),
                b_max=float(intensity["b_max"]),
                clip=bool(intensity["clip"]),
            )
        )
    foreground = c["foreground"]
    if foreground["enabled"]:
        transforms += [
            RequireForegroundd(keys=key, threshold=foreground["threshold"]),
            CropForegroundd(
                keys=key,
                source_key=key,
                select_fn=ForegroundAbove(foreground["threshold"]),
                margin=int(foreground["margin"]),
                allow_smaller=True,
            ),
        ]
    transforms.append(ToStoraged(keys=key, dtype=_STORAGE_DTYPES[c["storage_dtype"]]))
    return Compose(transforms)


# ---------------------------------------------------------------------------------------------
# After the cache
# ---------------------------------------------------------------------------------------------


def pick_frame(volume: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Pick one frame of a ``(T, H, W, D)`` series uniformly at random (a view, no copy).

    Args:
        volume: ``(T, H, W, D)`` tensor; ``T = 1`` for a 3D volume.
        rng: generator of the draw.

    Returns:
        ``(1, H, W, D)`` view of the chosen frame.
    """
    frames = volume.shape[0]
    index = int(rng.integers(0, frames)) if frames > 1 else 0
    return volume[index : index + 1]
