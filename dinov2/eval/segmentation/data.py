"""Preset-driven MONAI pipelines and datasets for finetuning, validation, testing and prediction.

Deterministic part (cached): load (several modality files stack as channels; a file no reader
can open is an ``InputVolumeError`` naming it), channel first, NaN/+-Inf replaced by the smallest
finite value of their channel (one warning per file), label remap, reorientation, resampling to the preset spacing, intensity normalisation, crop to
the foreground, pad to the crop size. Random part (per worker, every iteration): crops centred
on foreground/background voxels in the preset's ratio, flips, 90° rotations, intensity scale and
shift. Multi-label presets turn the label map into one binary channel per region at the end.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    MapLabelValued,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)

from dinov2.data.datalist import load_finetune_datalist, subset_training
from dinov2.data.preflight import LabelRule, PreflightCache, checked_finetune_datalist
from dinov2.data.readers import image_readers
from dinov2.data.transforms import ReplaceNonFinited
from dinov2.data.validation import LoadVolumed
from dinov2.eval.presets import DatasetPreset

from .ignore import CROP_CENTRE_KEYS, IGNORED, AnnotatedCropCentresd

logger = logging.getLogger(__name__)


def nonzero(x):
    """Foreground selector of ``CropForegroundd``: voxels a normalisation left non-zero.

    Module-level (not a lambda) so the transforms pickle for worker processes and disk caches.
    """
    return x != 0


class LabelToRegionsd(MapTransform):
    """Label map ``(1, H, W, D)`` → binary region channels ``(K, H, W, D)`` (multi-label presets);
    an ignored voxel (:data:`~.ignore.IGNORED`) stays ignored in every channel.

    Args:
        keys: keys holding label maps.
        regions: ``{name: label values}``; channel k is 1 where the label is any of region k's values.
    """

    def __init__(self, keys, regions: dict[str, Sequence[int]]):
        super().__init__(keys)
        self.values = [list(v) for v in regions.values()]

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            channels = [torch.isin(label[0], torch.tensor(v, device=label.device)) for v in self.values]
            out = torch.stack(channels).to(torch.float32)
            out = torch.where(label[0] == IGNORED, IGNORED, out)
            d[key] = label.__class__(out, meta=label.meta) if hasattr(label, "meta") else out
        return d


class SelectFramed(MapTransform):
    """Keep one frame of a channel-first 4D series ``(T, X, Y, Z)`` as ``(1, X, Y, Z)``; 3D passes.

    Not invertible on purpose: the prediction belongs to the chosen frame's 3D grid, which is the
    input's spatial grid.
    """

    def __init__(self, keys, frame: int):
        super().__init__(keys)
        self.frame = int(frame)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            if x.shape[0] > 1:
                d[key] = x[self.frame:self.frame + 1]
        return d


def deterministic_transforms(preset: DatasetPreset, with_label: bool = True, pad: bool = True,
                             frame: int | None = None) -> list:
    """The cached, invertible preprocessing of one case.

    Args:
        preset: the dataset preset.
        with_label: also load and resample ``label``.
        pad: pad every volume to at least ``roi_size`` (training crops need it; evaluation does
            not, sliding-window inference pads by itself).
        frame: keep this frame of a 4D image (prediction's ``--frame``); None keeps every channel.

    Returns:
        A list of MONAI dictionary transforms.
    """
    keys = ["image", "label"] if with_label else ["image"]
    t: list = [LoadVolumed(keys=keys, reader=image_readers(), image_only=True), EnsureChannelFirstd(keys=keys)]
    if frame is not None:
        t.append(SelectFramed(keys="image", frame=frame))
    t.append(ReplaceNonFinited(keys="image", fill="min", channel_wise=True))
    if with_label and preset.remap:
        t.append(MapLabelValued(keys="label", orig_labels=list(preset.remap), target_labels=list(preset.remap.values())))
    if with_label and preset.ignore_label is not None:  # see .ignore: -1 marks what loss and metrics leave out
        t.append(MapLabelValued(keys="label", orig_labels=[preset.ignore_label], target_labels=[IGNORED]))
    # Anatomical axis labels stated explicitly: MONAI's default for them is changing (FutureWarning).
    t.append(Orientationd(keys=keys, axcodes=preset.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    t.append(Spacingd(keys=keys, pixdim=preset.spacing, mode=("bilinear", "nearest")[: len(keys)]))
    t.append(intensity_transform(preset))
    if preset.crop_foreground:
        t.append(CropForegroundd(keys=keys, source_key="image", select_fn=nonzero, allow_smaller=True))
    if pad:
        t.append(SpatialPadd(keys=keys, spatial_size=preset.roi_size))
    t.append(EnsureTyped(keys=keys, track_meta=True))
    return t


def intensity_transform(preset: DatasetPreset) -> MapTransform:
    """The preset's intensity normalisation of ``image``."""
    i = preset.intensity
    if i["mode"] == "ct_window":
        return ScaleIntensityRanged(keys="image", a_min=float(i["lower"]), a_max=float(i["upper"]),
                                    b_min=float(i["b_min"]), b_max=float(i["b_max"]), clip=True)
    if i["mode"] == "percentile":
        return ScaleIntensityRangePercentilesd(keys="image", lower=float(i["lower"]), upper=float(i["upper"]),
                                               b_min=float(i["b_min"]), b_max=float(i["b_max"]), clip=True,
                                               channel_wise=True)
    return NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)


def random_transforms(preset: DatasetPreset) -> list:
    """Random crop (foreground/background ratio) and augmentations of training samples."""
    s, a = preset.sampling, preset.augment
    keys = ["image", "label"]
    # with an ignore label, crops are centred on annotated voxels only (see .ignore)
    t: list = [AnnotatedCropCentresd()] if preset.ignore_label is not None else []
    t.append(RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=preset.roi_size, pos=s["pos"],
                                    neg=s["neg"], num_samples=s["num_samples"], image_key="image", image_threshold=0,
                                    **(CROP_CENTRE_KEYS if preset.ignore_label is not None else {})))
    if a["flip_prob"] > 0:
        t += [RandFlipd(keys=keys, prob=a["flip_prob"], spatial_axis=axis) for axis in range(3)]
    if a["rot90_prob"] > 0:
        t.append(RandRotate90d(keys=keys, prob=a["rot90_prob"], max_k=3))
    if a["intensity_prob"] > 0 and a["scale_intensity"] > 0:
        t.append(RandScaleIntensityd(keys="image", factors=a["scale_intensity"], prob=a["intensity_prob"]))
    if a["intensity_prob"] > 0 and a["shift_intensity"] > 0:
        t.append(RandShiftIntensityd(keys="image", offsets=a["shift_intensity"], prob=a["intensity_prob"]))
    return t


def train_transforms(preset: DatasetPreset) -> Compose:
    """Deterministic preprocessing + random crops/augmentations (+ region channels)."""
    t = deterministic_transforms(preset) + random_transforms(preset)
    if preset.multilabel:
        t.append(LabelToRegionsd(keys="label", regions=preset.regions))
    return Compose(t)


def eval_transforms(preset: DatasetPreset, with_label: bool = True, frame: int | None = None) -> Compose:
    """Deterministic preprocessing of whole volumes for validation, testing and prediction
    (``frame``: the frame of a 4D image to predict, see :func:`deterministic_transforms`)."""
    t = deterministic_transforms(preset, with_label=with_label, pad=False, frame=frame)
    if with_label and preset.multilabel:
        t.append(LabelToRegionsd(keys="label", regions=preset.regions))
    return Compose(t)


def resolve_datalist(preset: DatasetPreset, base_data_dir: str | os.PathLike) -> Path:
    """The datalist JSON: ``<base_data_dir>/<preset.datalist>`` (default ``dataset.json``).

    Raises:
        FileNotFoundError: names the path and both ways to fix it.
    """
    base = Path(base_data_dir)
    if not base.is_dir():
        raise FileNotFoundError(f"--base-data-dir {base} is not a folder. Pass the folder holding the datalist "
                                f"'{preset.datalist}' and the images it lists.")
    path = base / preset.datalist
    if not path.is_file():
        hint = ""
        if preset.raw.get("sample_command"):
            command = str(preset.raw["sample_command"]).replace("<base_data_dir>", str(base))
            hint = f" This preset's sample data is written by: {command}."
        raise FileNotFoundError(f"Datalist {path} not found. Put it there, or point the preset at it with "
                                f"dataset.datalist=<file relative to {base}>.{hint}")
    return path


def _entry(entry: dict, preset: DatasetPreset, with_label: bool) -> dict:
    image = entry["image"]
    images = image if isinstance(image, list) else [image]
    if len(images) != preset.in_channels:
        raise ValueError(f"Datalist entry {entry.get('name', image)} has {len(images)} image file(s) but the preset "
                         f"'{preset.name}' expects {preset.in_channels} modalities {list(preset.modalities)}.")
    out = {"image": images if len(images) > 1 else images[0], "name": entry.get("name") or Path(images[0]).name}
    if with_label:
        if "label" not in entry or not isinstance(entry["label"], str):
            raise ValueError(f"Datalist entry {out['name']} needs a label map path for segmentation")
        out["label"] = entry["label"]
    return out


def label_classes(preset: DatasetPreset) -> tuple[set[int], str]:
    """Label values a label map of ``preset`` may hold, as stored (before ``dataset.remap``), and
    the classes in words for messages.

    Multi-class presets take the class indices ``0..K-1``; multi-label presets 0 (background) and
    every value of a region. A value ``v`` listed in ``remap`` is allowed when ``remap[v]`` is; a
    value not listed there is taken as it is. ``dataset.ignore_label`` is allowed too.
    """
    if preset.multilabel:
        targets = {0} | {int(v) for values in preset.regions.values() for v in values}
        words = "0 background, " + ", ".join(f"{name} = {list(values)}" for name, values in preset.regions.items())
    else:
        targets = set(range(len(preset.classes)))
        words = ", ".join(f"{i} {name}" for i, name in enumerate(preset.classes))
    if preset.ignore_label is not None:
        targets.add(preset.ignore_label)
        words += f", {preset.ignore_label} ignore (unannotated)"
    allowed = {v for v in targets if v not in preset.remap}
    allowed |= {int(k) for k, v in preset.remap.items() if int(v) in targets}
    if preset.remap:
        words += f"; stored values are first mapped by dataset.remap {dict(preset.remap)}"
    return allowed, words


def load_splits(preset: DatasetPreset, base_data_dir: str | os.PathLike, dataset_percent: float = 100.0,
                seed: int = 0, validate: bool = True, *, skip_bad: bool = False,
                report_dir: str | os.PathLike | None = None, read_voxels: bool = True) -> dict[str, list[dict]]:
    """Training (optionally subset), validation and test entries with absolute paths.

    Args:
        preset: the dataset preset.
        base_data_dir: folder of the datalist.
        dataset_percent: keep this percentage of the training cases (nested, seeded).
        seed: seed of the subset.
        validate: the pre-flight (:mod:`dinov2.data.preflight`): every file's header and grid,
            and (``read_voxels``) every image and label map read in full: truncated files,
            volumes without a finite voxel, label values that are not classes of the preset.
        skip_bad: leave cases with a bad file out (``skipped.tsv`` in ``report_dir``) instead of failing.
        report_dir: the run folder.
        read_voxels: read every file in full during validation (False: headers and grids only).

    Raises:
        DatalistError: every bad entry (files, grids, label values) at once.
    """
    path = resolve_datalist(preset, base_data_dir)
    if validate:
        allowed, words = label_classes(preset)
        fix = (f"correct the label map, or map its values onto the classes of preset '{preset.name}' with "
               "dataset.remap={stored: class}")
        datalist = checked_finetune_datalist(
            path, channels=preset.in_channels, labels=LabelRule(tuple(sorted(allowed)), words, fix), skip=skip_bad,
            report_dir=report_dir, read_voxels=read_voxels, cache=PreflightCache(), progress=False)
    else:
        datalist = load_finetune_datalist(path, validate=False, progress=False)
    training = datalist["training"]
    if dataset_percent < 100:
        training = subset_training(training, dataset_percent, seed)
        logger.info("Using %d of %d training cases (--dataset-percent %g)", len(training), len(datalist["training"]),
                    dataset_percent)
    splits = {
        "training": [_entry(e, preset, True) for e in training],
        "validation": [_entry(e, preset, True) for e in datalist.get("validation", [])],
        "test": [_entry(e, preset, "label" in e) for e in datalist.get("test", [])],
    }
    if not splits["validation"]:
        raise ValueError(f"{path} has no 'validation' cases; model selection needs at least one.")
    return splits


def make_dataset(entries: list[dict], transform: Compose, cache_dir: str | os.PathLike | None,
                 cache_rate: float = 1.0, num_workers: int = 0) -> Dataset:
    """Cached dataset: on disk under ``cache_dir`` when given (survives restarts), else in RAM."""
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        return PersistentDataset(entries, transform=transform, cache_dir=cache_dir)
    return CacheDataset(entries, transform=transform, cache_rate=cache_rate, num_workers=num_workers or None,
                        progress=False)


def spacing_of(image: Any) -> tuple[float, ...]:
    """Voxel spacing (mm) of a MetaTensor from its affine."""
    affine = np.asarray(image.affine if hasattr(image, "affine") else np.eye(4), dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(0)))
