"""Instance segmentation data: datalist → stacks → model inputs, distance targets and training crops.

* Datalist: the finetuning layout (``training`` / ``validation`` / ``test`` lists of ``{"image",
  "label", "spacing": [x, y, z] (optional)}``, paths relative to its folder), read by
  :func:`dinov2.data.datalist.load_finetune_datalist` for its structure; every stack is then read
  by :mod:`.io` before training, and every bad file is listed in ONE :class:`DatalistError`.
* Preprocessing (:class:`Preprocessing`, stored in the checkpoint so ``segment`` repeats it):
  intensity normalisation (segmentation's :func:`~dinov2.eval.segmentation.data.intensity_transform`,
  percentiles by default), then resampling by per-axis zoom factors (``dataset.scale``, or
  ``dataset.target_spacing``) so that small objects span more tokens of the ViT. A prediction is
  resampled back to the stack's own grid, where the watershed runs and the scores are measured.
* Target: :func:`.targets.distance_target` of the resampled labels, with the resampled spacing.
* Training samples: random crops of ``dataset.image_size`` (stacks padded to it first), flips
  along every axis, 90° rotations in the X-Y plane, optional intensity scale / shift (MONAI).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import Dataset
from monai.transforms import (Compose, RandFlipd, RandRotate90d, RandScaleIntensityd, RandShiftIntensityd,
                              RandSpatialCropSamplesd, SpatialPadd)

from dinov2.data.datalist import load_finetune_datalist
from dinov2.data.datalist.format import SPLITS, DatalistError, Problem
from dinov2.data.validation import InputVolumeError
from dinov2.eval.segmentation.data import intensity_transform
from dinov2.utils.config import ConfigError

from .io import Stack, check_spacing, read_image, read_labels
from .targets import distance_target


@dataclass(frozen=True)
class Preprocessing:
    """What turns a stack into a model input (the ``dataset`` keys of the run config).

    Attributes:
        intensity: segmentation's ``dataset.intensity`` section (``mode``, ``lower``, ``upper``,
            ``b_min``, ``b_max``).
        scale: zoom factor of every axis (2 = twice the voxels per axis).
        target_spacing: instead of ``scale``: the voxel size ``(x, y, z)`` to resample to.
        roi_size: training crop = sliding window ``(X, Y, Z)``, in resampled voxels.
    """

    intensity: Mapping[str, Any]
    scale: float = 1.0
    target_spacing: tuple[float, float, float] | None = None
    roi_size: tuple[int, int, int] = (32, 32, 32)

    @classmethod
    def from_config(cls, dataset: Mapping[str, Any]) -> "Preprocessing":
        """From the ``dataset`` section of a run config (a checkpoint's too).

        Raises:
            ConfigError: ``scale`` not positive, ``target_spacing`` not three positive numbers.
        """
        scale = float(dataset["scale"])
        if not scale > 0:
            raise ConfigError(f"dataset.scale must be a positive zoom factor (2 = twice the voxels per axis, 1 = "
                              f"none), got {scale}")
        target = check_spacing(dataset["target_spacing"], "dataset.target_spacing")
        size = dataset["image_size"]
        roi = tuple(int(s) for s in (size if isinstance(size, Sequence) else [size] * 3))
        return cls(dict(dataset["intensity"]), scale, target, roi)  # type: ignore[arg-type]

    def zoom(self, spacing: Sequence[float]) -> tuple[float, float, float]:
        """Per-axis zoom factors of a stack of voxel size ``spacing``."""
        if self.target_spacing is not None:
            return tuple(float(s) / t for s, t in zip(spacing, self.target_spacing))  # type: ignore[return-value]
        return (self.scale,) * 3

    def grid(self, stack: Stack) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
        """``(shape, spacing)`` of ``stack`` once resampled."""
        zoom = self.zoom(stack.spacing)
        shape = tuple(max(1, int(round(n * z))) for n, z in zip(stack.shape, zoom))
        # the spacing of the grid actually made, not of the rounded-away zoom
        spacing = tuple(s * n / m for s, n, m in zip(stack.spacing, stack.shape, shape))
        return shape, spacing  # type: ignore[return-value]


def resize(volume: torch.Tensor, shape: Sequence[int], labels: bool = False) -> torch.Tensor:
    """``(C, X, Y, Z)`` resampled to ``(C, *shape)``: trilinear, or nearest voxel centre for labels."""
    if tuple(volume.shape[1:]) == tuple(shape):
        return volume
    mode = "nearest-exact" if labels else "trilinear"
    out = F.interpolate(volume[None].float(), size=tuple(shape), mode=mode,
                        **({} if labels else {"align_corners": False}))[0]
    return out.round().to(volume.dtype) if labels else out


def model_input(stack: Stack, prep: Preprocessing) -> torch.Tensor:
    """The normalised, resampled image ``(1, X', Y', Z')`` float32 of an image stack."""
    normalise = intensity_transform(SimpleNamespace(intensity=prep.intensity))
    image = normalise({"image": torch.from_numpy(stack.array[None].astype(np.float32))})["image"]
    return resize(torch.as_tensor(image).float(), prep.grid(stack)[0])


def distance_map(labels: Stack, prep: Preprocessing) -> torch.Tensor:
    """The regression target ``(1, X', Y', Z')`` in [0, 1] of a label stack, on the resampled grid."""
    shape, spacing = prep.grid(labels)
    resampled = resize(torch.from_numpy(labels.array[None].astype(np.int64)), shape, labels=True)[0].numpy()
    return torch.from_numpy(distance_target(resampled, spacing))[None]


def to_stack_grid(distance: torch.Tensor, stack: Stack) -> np.ndarray:
    """A predicted distance ``(1, X', Y', Z')`` resampled back to ``stack``'s grid: ``(X, Y, Z)`` float32."""
    return resize(distance.float(), stack.shape)[0].numpy()


@dataclass
class Case:
    """One datalist entry, read: the image stack and (when labelled) its instance labels."""

    name: str
    image: Stack
    labels: Stack | None


def _read_case(entry: dict, where: str, labelled: bool) -> tuple[Case | None, list[Problem]]:
    """The case of a datalist entry, or the problems of its files."""
    image_path, spacing = entry["image"], entry.get("spacing")
    if isinstance(image_path, list):
        if len(image_path) != 1:
            return None, [Problem(where + ".image", str(image_path[0]), f"{len(image_path)} image files",
                                  "instance segmentation takes one grey-level stack per entry")]
        image_path = image_path[0]
    try:
        image = read_image(image_path, spacing=spacing)
    except InputVolumeError as exc:
        return None, [Problem(where + ".image", str(exc.path), exc.problem, exc.fix or "fix or remove the entry")]
    labels = None
    if isinstance(entry.get("label"), str):
        try:
            labels = read_labels(entry["label"], like=image, spacing=spacing)
        except InputVolumeError as exc:
            return None, [Problem(where + ".label", str(exc.path), exc.problem, exc.fix or "fix or remove the entry")]
    elif labelled:
        return None, [Problem(where, image_path, "no instance label stack ('label')",
                              'add "label": "<labels>.tif" to the entry')]
    return Case(entry.get("name") or Path(image_path).name, image, labels), []


def load_cases(datalist: str | os.PathLike) -> dict[str, list[Case]]:
    """Read every stack of a finetuning datalist (the pre-flight: nothing is trained before all read).

    Args:
        datalist: JSON with ``training`` and ``validation`` entries (``test`` optional, its labels
            too); an entry's ``spacing`` overrides the file's.

    Returns:
        ``{"training", "validation", "test"}`` → cases in datalist order.

    Raises:
        DatalistError: malformed JSON, or every unreadable / mismatched / unlabelled file at once.
    """
    path = Path(datalist)
    entries = load_finetune_datalist(path, validate=False, progress=False)
    cases: dict[str, list[Case]] = {split: [] for split in SPLITS}
    problems: list[Problem] = []
    for split in SPLITS:
        for i, entry in enumerate(entries[split]):
            case, found = _read_case(entry, f"{split}[{i}]", split != "test")
            problems += found
            if case is not None:
                cases[split].append(case)
    if not entries["validation"]:
        problems.append(Problem("validation", None, "no validation entries",
                                "add at least one labelled stack: the thresholds and the best model are chosen on it"))
    if problems:
        raise DatalistError(path, problems)
    return cases


def training_dataset(cases: Sequence[Case], prep: Preprocessing, crops_per_stack: int,
                     augment: Mapping[str, float]) -> Dataset:
    """Random training crops of the preprocessed ``cases`` (computed once, kept in memory).

    Each item is a list of ``crops_per_stack`` dicts: ``image`` ``(1, *roi_size)`` and ``label``
    ``(1, *roi_size)``, the distance target (named ``label`` as in segmentation, whose training
    step reads it).
    """
    data = [{"image": model_input(c.image, prep), "label": distance_map(c.labels, prep)} for c in cases]
    keys = ["image", "label"]
    t: list = [SpatialPadd(keys=keys, spatial_size=prep.roi_size),
               RandSpatialCropSamplesd(keys=keys, roi_size=prep.roi_size, num_samples=int(crops_per_stack),
                                       random_size=False)]
    if augment["flip_prob"] > 0:
        t += [RandFlipd(keys=keys, prob=float(augment["flip_prob"]), spatial_axis=axis) for axis in range(3)]
    if augment["rot90_prob"] > 0:  # in the X-Y plane: Z often has another spacing
        if prep.roi_size[0] != prep.roi_size[1]:
            raise ConfigError(f"dataset.augment.rot90_prob rotates crops in the X-Y plane, which needs X = Y in "
                              f"dataset.image_size, got {list(prep.roi_size)}; make them equal or set rot90_prob=0")
        t.append(RandRotate90d(keys=keys, prob=float(augment["rot90_prob"]), max_k=3, spatial_axes=(0, 1)))
    if augment["intensity_prob"] > 0 and augment["scale_intensity"] > 0:
        t.append(RandScaleIntensityd(keys="image", factors=float(augment["scale_intensity"]),
                                     prob=float(augment["intensity_prob"])))
    if augment["intensity_prob"] > 0 and augment["shift_intensity"] > 0:
        t.append(RandShiftIntensityd(keys="image", offsets=float(augment["shift_intensity"]),
                                     prob=float(augment["intensity_prob"])))
    return Dataset(data, transform=Compose(t))
