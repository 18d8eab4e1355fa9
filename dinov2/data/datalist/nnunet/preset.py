"""The dataset preset YAML of an nnU-Net raw dataset (the keys of ``dinov2/configs/datasets/*.yaml``).

nnU-Net -> preset:

* ``channel_names`` -> ``modalities`` (channel order);
* ``labels`` -> ``classes`` (index = label value) with ``loss: dice_ce``; region-based labels ->
  ``regions`` with ``loss: dice_sigmoid`` and ``regions_class_order`` (how predictions are painted
  back); a label named ``ignore`` -> ``ignore_label`` (left out of loss and metrics);
* normalisation as nnU-Net does it, in our ``intensity`` vocabulary (:func:`intensity_from_channels`);
* ``spacing``: the median voxel spacing of the training images along R, A, S; ``orientation: RAS``;
  ``image_size``: the median resampled extent, rounded up to 16 voxels, at most 96.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from dinov2.data.image_io import VolumeHeader

from .dataset import NnunetDataset
from .meta import NnunetLabels

PATCH = 16  # image_size must be a multiple of the ViT patch size
MAX_SIDE = 96  # the crop of the packaged presets (UNETR's usual window)
VOXELS_PER_CASE = 100_000  # foreground voxels sampled per case for the CT statistics
SAMPLING = {"pos": 1, "neg": 1, "num_samples": 2}
AUGMENT = {"flip_prob": 0.5, "rot90_prob": 0.0, "intensity_prob": 0.5, "scale_intensity": 0.1, "shift_intensity": 0.1}


def _ras_order(header: VolumeHeader) -> np.ndarray:
    """For each voxel axis, the world axis (0 R, 1 A, 2 S) it runs along."""
    if header.affine is None:
        return np.arange(3)
    return nib.orientations.io_orientation(header.affine)[:, 0].astype(int)


def _ras(values: Sequence[float], header: VolumeHeader) -> np.ndarray:
    """Per-voxel-axis ``values`` reordered to R, A, S (what they become after reorientation to RAS)."""
    out = np.empty(3)
    out[_ras_order(header)] = np.asarray(values[:3], dtype=float)
    return out


def median_spacing(headers: Sequence[VolumeHeader]) -> list[float]:
    """Median voxel spacing (mm) of the training images along R, A, S."""
    spacing = np.median([_ras(h.spacing, h) for h in headers], axis=0)
    return [round(float(s), 4) for s in spacing]


def image_size(headers: Sequence[VolumeHeader], spacing: Sequence[float]) -> list[int]:
    """Training crop: the median extent at ``spacing`` per axis, rounded up to ``PATCH``, at most ``MAX_SIDE``."""
    extent = np.median([_ras(h.spatial_shape, h) * _ras(h.spacing, h) for h in headers], axis=0)
    voxels = extent / np.asarray(spacing, dtype=float)
    return [int(min(MAX_SIDE, max(PATCH, math.ceil(v / PATCH - 1e-6) * PATCH))) for v in voxels]


def label_settings(labels: NnunetLabels) -> dict[str, Any]:
    """``classes`` + ``dice_ce``, or ``regions`` + ``dice_sigmoid`` + ``regions_class_order``; ``ignore_label``."""
    foreground = labels.foreground
    if labels.region_based:
        out: dict[str, Any] = {"regions": {k: list(v) for k, v in foreground.items()}, "loss": "dice_sigmoid",
                               "regions_class_order": list(labels.regions_class_order)}
    else:
        background = next(k for k, v in labels.values.items() if v == (0,))
        names = {v[0]: k for k, v in foreground.items()}
        out = {"classes": [background] + [names[i] for i in range(1, len(names) + 1)], "loss": "dice_ce"}
    out["ignore_label"] = labels.ignore
    return out


def _normalisation(name: str) -> str:
    """nnU-Net's normalisation of a channel name: ct, rescale_to_0_1, rgb_to_0_1, nonorm or zscore."""
    key = name.casefold()
    return key if key in ("ct", "rescale_to_0_1", "rgb_to_0_1", "nonorm") else "zscore"


def foreground_intensities(entries: Sequence[dict], channels: Sequence[int], ignore: int | None,
                           max_cases: int, seed: int) -> tuple[np.ndarray, int]:
    """Intensities of foreground voxels (label > 0, not ignore) of ``channels`` over a seeded sample of cases.

    Returns:
        ``(values (N,), cases read)``: at most ``VOXELS_PER_CASE`` random voxels per case and channel.
    """
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.permutation(len(entries))[:max_cases])
    samples = []
    for i in chosen:
        label = np.asanyarray(nib.load(entries[i]["label"]).dataobj)
        mask = (label > 0) & (label != ignore) if ignore is not None else label > 0
        for c in channels:
            values = np.asanyarray(nib.load(entries[i]["image"][c]).dataobj)[mask].astype(np.float64)
            keep = rng.permutation(values.size)[:VOXELS_PER_CASE] if values.size > VOXELS_PER_CASE else slice(None)
            samples.append(values[keep])
    return (np.concatenate(samples) if samples else np.zeros(0)), len(chosen)


def _ct_window(dataset: NnunetDataset, channels: list[int], max_cases: int, seed: int) -> tuple[dict, str] | None:
    """nnU-Net's CT normalisation as a ``ct_window``; None when the foreground has no spread."""
    values, n_cases = foreground_intensities(dataset.training, channels, dataset.labels.ignore, max_cases, seed)
    if values.size == 0:
        return None
    low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    mean, std = float(values.mean()), max(float(values.std()), 1e-8)
    if not low < high:
        return None
    # clip(x, low, high) then (x - mean) / std is a clipped linear map of [low, high] onto
    # [(low - mean) / std, (high - mean) / std]: exactly what ct_window computes.
    intensity = {"mode": "ct_window", "lower": round(low, 4), "upper": round(high, 4),
                 "b_min": round((low - mean) / std, 6), "b_max": round((high - mean) / std, 6)}
    note = (f"nnU-Net's CT normalisation, exactly: clip to the 0.5/99.5 percentiles of the training foreground "
            f"voxels ({n_cases} case(s) sampled, seed {seed}), then (x - mean {mean:.4g}) / std {std:.4g}")
    return intensity, note


def intensity_from_channels(dataset: NnunetDataset, max_cases: int = 50,
                            seed: int = 0) -> tuple[dict[str, Any], bool, str]:
    """``intensity``, ``crop_foreground`` and a comment saying how they render nnU-Net's normalisation.

    nnU-Net normalises each channel by its name: ``CT`` -> clip to the foreground's 0.5/99.5
    percentiles, then the foreground's global mean/std (exact here as ``ct_window`` with
    ``b_min``/``b_max``, :func:`_ct_window`); ``rescale_to_0_1`` -> per-image min-max
    (``percentile`` 0/100); ``rgb_to_0_1`` -> /255 (``ct_window`` 0..255); anything else ->
    per-image z-score (``zscore``, over non-zero voxels here). Our ``intensity`` is one setting
    for every channel, so channels with different schemes all get ``zscore`` (said in the comment).
    """
    schemes = {_normalisation(name) for name in dataset.channels}
    scheme = schemes.pop() if len(schemes) == 1 else "mixed"
    if scheme == "ct":
        found = _ct_window(dataset, list(range(len(dataset.channels))), max_cases, seed)
        if found:
            return found[0], False, found[1] + "; no foreground crop (normalised CT has no zero background)"
        return {"mode": "zscore"}, True, "CT foreground without spread: per-image z-score, not nnU-Net's CT scheme"
    if scheme == "rescale_to_0_1":
        return {"mode": "percentile", "lower": 0.0, "upper": 100.0}, True, "nnU-Net's rescale_to_0_1: per-image min-max"
    if scheme == "rgb_to_0_1":
        return {"mode": "ct_window", "lower": 0.0, "upper": 255.0}, True, "nnU-Net's rgb_to_0_1: 0..255 -> 0..1"
    why = {"zscore": "nnU-Net's per-image z-score (here over the non-zero voxels)",
           "nonorm": "noNorm cannot be expressed here: per-image z-score instead",
           "mixed": f"channels {list(dataset.channels)} use different nnU-Net schemes, but one intensity setting "
                    "covers every channel here: per-image z-score for all"}[scheme]
    return {"mode": "zscore"}, True, why


def build_preset(dataset: NnunetDataset, datalist: str, max_cases: int = 50,
                 seed: int = 0) -> tuple[dict[str, Any], dict[str, str]]:
    """The preset of ``dataset`` and a comment per key.

    Args:
        dataset: a checked dataset (:func:`~.dataset.read_nnunet_dataset`).
        datalist: the datalist's path relative to ``--base-data-dir``.
        max_cases: training cases sampled for CT statistics.
        seed: seed of that sample.

    Returns:
        ``(preset, comments)``: preset keys in the order of the packaged presets.
    """
    headers = list(dataset.headers.values())
    spacing = median_spacing(headers)
    intensity, crop, intensity_note = intensity_from_channels(dataset, max_cases, seed)
    preset = {"name": dataset.name, "datalist": datalist, "modalities": list(dataset.channels),
              **label_settings(dataset.labels), "spacing": spacing, "orientation": "RAS", "intensity": intensity,
              "crop_foreground": crop, "image_size": image_size(headers, spacing), "sampling": dict(SAMPLING),
              "augment": dict(AUGMENT)}
    comments = {
        "datalist": "relative to --base-data-dir",
        "modalities": "dataset.json channel_names, in channel order",
        "classes": "dataset.json labels: index = label value",
        "regions": "dataset.json region-based labels: one sigmoid channel each",
        "regions_class_order": "label value painted for each region, in this order (predictions)",
        "ignore_label": "the label named 'ignore': left out of loss and metrics" if dataset.labels.ignore is not None
        else "no 'ignore' label",
        "spacing": f"median voxel spacing (mm) of the {len(headers)} training images along R, A, S",
        "intensity": intensity_note,
        "image_size": f"median extent at that spacing, rounded up to {PATCH}, at most {MAX_SIDE}",
    }
    return preset, comments


def preset_yaml(preset: dict[str, Any], comments: dict[str, str], header: Sequence[str]) -> str:
    """YAML text of ``preset``: one key per line (JSON flow values), its comment after it, ``header`` lines first."""
    lines = [f"# {line}" for line in header]
    for key, value in preset.items():
        if value is None and key not in comments:
            continue
        note = comments.get(key)
        lines.append(f"{key}: {json.dumps(value, ensure_ascii=False)}" + (f"  # {note}" if note else ""))
    return "\n".join(lines) + "\n"


def write_preset(text: str, path: Path) -> Path:
    """Write the preset text (parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
