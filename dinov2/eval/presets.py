"""Dataset presets: everything dataset-specific about an evaluation lives in one YAML file.

Shared by segmentation finetuning (:mod:`dinov2.eval.segmentation`) and linear probing
(:mod:`dinov2.eval.linear`), which both look presets up with :func:`load_preset`.

A preset is selected with ``--dataset-name`` (a packaged name such as ``btcv``, or the path of a
YAML file) and merged into the ``dataset`` section of the run's config, so any key can still be
overridden on the command line (``dataset.image_size=[64,64,64]``). A new dataset is a new YAML
file; no code branches on a dataset's name. The keys of a segmentation preset, with their
defaults, are the ``dataset:`` section of ``dinov2/configs/eval/segmentation_default.yaml``
(examples in ``dinov2/configs/datasets/*.yaml``):

================  ==================================================================================
``name``          label of the dataset in logs and results
``datalist``      datalist JSON relative to ``--base-data-dir`` (default ``dataset.json``)
``modalities``    one name per image channel (a datalist entry's ``image`` lists one file each)
``classes``       multi-class tasks: class names, index = label value after ``remap``; 0 = background
``regions``       multi-label tasks instead: ``{name: [label values]}``, one sigmoid channel each
``regions_class_order``  regions only: the label value painted for each region, in order, when
                  predictions are written (nnU-Net's convention; optional)
``ignore_label``  label value of unannotated voxels, left out of loss and metrics (optional)
``remap``         ``{source value: target value}`` applied to label maps first (optional)
``loss``          ``dice_ce`` (softmax, needs ``classes``) or ``dice_sigmoid`` (needs ``regions``)
``loss_weights``  ``{dice, ce}``: the weight of each term (``ce`` for ``dice_ce`` only)
``dice_variant``  ``dice``, ``squared`` or ``jaccard`` (MONAI ``DiceLoss`` options)
``spacing``       target voxel spacing in mm (3 floats)
``nsd_tolerance_mm``  normalised surface Dice tolerance in mm: one number (default 1) or one per
                  channel (:mod:`dinov2.eval.segmentation.metrics`)
``orientation``   target axis codes (``RAS``)
``intensity``     the pretraining preprocessing's vocabulary: ``{mode: ct_window, lower, upper}``
                  (a fixed window, e.g. CT HU, mapped to ``[b_min, b_max]`` = [0, 1] and clipped),
                  ``{mode: percentile, lower, upper}`` (per channel, mapped to [0, 1]), or
                  ``{mode: zscore}`` (per channel over non-zero voxels). The old spelling
                  ``{mode: window | percentile, range: [low, high]}`` is read with a warning.
``crop_foreground``  crop each volume to the bounding box of non-zero (normalised) image voxels
``image_size``    training crop and sliding-window size (3 ints, multiples of the patch size;
                  ``roi_size`` before, still read from older checkpoints)
``sampling``      ``{pos, neg, num_samples}``: crops centred on foreground vs background voxels
``augment``       ``{flip_prob, rot90_prob, intensity_prob, scale_intensity, shift_intensity}``
================  ==================================================================================
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from dinov2.utils.config import load_yaml, packaged_config_path
from dinov2.utils.deprecation import warn_deprecated_key

LOSSES = ("dice_ce", "dice_sigmoid")
INTENSITY_MODES = ("ct_window", "percentile", "zscore")
# Keys of segmentation_default.yaml's `dataset:` section that belong to the run, not the dataset.
_RUN_KEYS = ("base_data_dir", "percent", "seed")


def segmentation_preset_defaults() -> DictConfig:
    """The defaults of every segmentation preset key (``dataset:`` of ``eval/segmentation_default.yaml``)."""
    section = load_yaml(packaged_config_path("eval/segmentation_default")).dataset
    for key in _RUN_KEYS:
        del section[key]
    return section


# Flags of the dataset, the same in every evaluation entry point (flag dest -> config key).
DATASET_FLAG_KEYS = {
    "dataset_name": "dataset.name", "base_data_dir": "dataset.base_data_dir", "dataset_percent": "dataset.percent",
    "dataset_seed": "dataset.seed", "image_size": "dataset.image_size", "skip_bad_inputs": "dataset.skip_bad_inputs",
}


def add_dataset_arguments(parser, image_size_help: str, image_size_triple: bool = True) -> None:
    """``--dataset-name``, ``--base-data-dir``, ``--dataset-percent``, ``--dataset-seed``, ``--image-size``,
    ``--skip-bad-inputs`` (:data:`DATASET_FLAG_KEYS`).

    Args:
        parser: an ``argparse.ArgumentParser``.
        image_size_help: what the input size is for in this task.
        image_size_triple: ``--image-size`` takes 1 or 3 ints; False: one int (a cube), for a command
            whose ``key=value`` overrides may follow the flag (intermixed parsing).
    """
    parser.add_argument("--dataset-name", default=None,
                        help="dataset preset: a packaged name (dinov2/configs/datasets: btcv, brats, la, brain_tissue, "
                        "brain_lobes) or a preset YAML path (dataset.name)")
    parser.add_argument("--base-data-dir", default=None,
                        help="folder holding the preset's datalist JSON; relative paths are read under it "
                        "(dataset.base_data_dir)")
    parser.add_argument("--dataset-percent", type=float, default=None,
                        help="%% of the training entries kept, nested subsets (dataset.percent)")
    parser.add_argument("--dataset-seed", type=int, default=None,
                        help="which training entries --dataset-percent keeps (dataset.seed)")
    parser.add_argument("--image-size", type=int, nargs="+" if image_size_triple else None, default=None,
                        metavar="SIZE", help=f"{image_size_help}: {'1 or 3 ints' if image_size_triple else 'the side of a cube'}, "
                        "multiples of the patch size (dataset.image_size)")
    parser.add_argument("--skip-bad-inputs", action="store_true", default=None,
                        help="leave datalist entries with a file that cannot be used out (listed in "
                        "<output-dir>/skipped.tsv) instead of failing (dataset.skip_bad_inputs)")


def dataset_flags(args) -> dict[str, Any]:
    """``{config key: value}`` of the dataset flags given (:func:`add_dataset_arguments`)."""
    flags = {key: getattr(args, dest, None) for dest, key in DATASET_FLAG_KEYS.items()}
    size = flags["dataset.image_size"]
    if isinstance(size, (list, tuple)):
        if len(size) not in (1, 3):
            raise ValueError(f"--image-size takes 1 or 3 ints, got {size}")
        flags["dataset.image_size"] = size[0] if len(size) == 1 else list(size)
    return flags


def load_preset(name_or_path: str | os.PathLike) -> DictConfig:
    """Read a preset: a packaged name (``btcv``, ``brats``, ``la``, ``brain_tissue``) or a YAML path.

    Raises:
        FileNotFoundError: neither a packaged preset nor an existing file; lists the packaged ones.
    """
    text = str(name_or_path)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return load_yaml(path)
    try:
        preset = load_yaml(packaged_config_path(f"datasets/{text}"))
    except FileNotFoundError:
        packaged = sorted(p.stem for p in packaged_config_path("ssl3d_default_config").parent.joinpath("datasets").glob("*.yaml"))
        raise FileNotFoundError(
            f"Unknown dataset '{text}': not a packaged preset ({', '.join(packaged)}) and not a YAML file. "
            "Pass --dataset-name with one of those names or the path of your own preset YAML.") from None
    if preset.get("name") not in (None, text):
        raise ValueError(f"Preset dinov2/configs/datasets/{text}.yaml names itself '{preset.name}'; fix the file.")
    return preset


def _triple(value: Any, key: str, kind=float) -> tuple:
    values = list(value) if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value] * 3
    if len(values) != 3:
        raise ValueError(f"dataset.{key} must hold 3 values (one per axis), got {values}")
    try:
        return tuple(kind(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"dataset.{key} must hold numbers, got {values}") from exc


def _old_intensity_spelling(intensity: dict, source: str) -> dict:
    """``{mode: window | percentile, range: [low, high]}`` (before one vocabulary) in today's keys, with a warning."""
    low, high = intensity.pop("range")
    if intensity.get("mode") == "window":
        warn_deprecated_key("dataset.intensity.mode=window", "dataset.intensity.mode=ct_window", source)
        intensity["mode"] = "ct_window"
    warn_deprecated_key("dataset.intensity.range", "dataset.intensity.lower / upper", source)
    intensity["lower"], intensity["upper"] = low, high
    return intensity


def intensity_settings(given: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A preset's ``intensity`` section, checked, in the one vocabulary shared with pretraining.

    Args:
        given: ``{mode, lower, upper, b_min, b_max}`` (``range`` / ``mode: window``: the old spelling).
        source: the preset, named in warnings.

    Returns:
        ``{mode, lower, upper, b_min, b_max}`` (``lower``/``upper`` None for ``zscore``).

    Raises:
        ValueError: an unknown mode, or bounds that are missing or out of order; names the key.
    """
    intensity = {k: v for k, v in dict(given).items()}
    if intensity.get("range") is not None:
        intensity = _old_intensity_spelling(intensity, source)
    intensity.pop("range", None)
    mode = intensity.get("mode")
    if mode not in INTENSITY_MODES:
        raise ValueError(f"dataset.intensity.mode must be one of {INTENSITY_MODES}, got {mode!r}")
    if mode in ("ct_window", "percentile"):
        low, high = intensity.get("lower"), intensity.get("upper")
        if low is None or high is None or not float(low) < float(high):
            raise ValueError(f"dataset.intensity.lower < upper is required for mode '{mode}', got {low!r} and {high!r}")
        if mode == "percentile" and not 0 <= float(low) < float(high) <= 100:
            raise ValueError(f"dataset.intensity percentiles must lie in [0, 100], got {low} and {high}")
    if not float(intensity["b_min"]) < float(intensity["b_max"]):
        raise ValueError(f"dataset.intensity needs b_min < b_max, got {intensity['b_min']} and {intensity['b_max']}")
    return intensity


@dataclass(frozen=True)
class DatasetPreset:
    """A validated preset (see the module docstring for the keys)."""

    name: str
    datalist: str
    modalities: tuple[str, ...]
    classes: tuple[str, ...] | None
    regions: dict[str, tuple[int, ...]] | None
    remap: dict[int, int]
    loss: str
    spacing: tuple[float, float, float]
    orientation: str
    intensity: dict[str, Any]
    crop_foreground: bool
    roi_size: tuple[int, int, int]
    sampling: dict[str, int]
    augment: dict[str, float]
    raw: dict = field(repr=False, default_factory=dict)
    regions_class_order: tuple[int, ...] | None = None
    ignore_label: int | None = None
    loss_weights: dict[str, float] = field(default_factory=lambda: {"dice": 1.0, "ce": 1.0})
    dice_variant: str = "dice"

    @property
    def multilabel(self) -> bool:
        """True for sigmoid multi-label tasks (``regions``)."""
        return self.regions is not None

    @property
    def out_channels(self) -> int:
        """Output channels of the network: classes (incl. background) or regions."""
        return len(self.regions) if self.multilabel else len(self.classes)

    @property
    def channel_names(self) -> list[str]:
        """Name of every output channel."""
        return list(self.regions) if self.multilabel else list(self.classes)

    @property
    def foreground_channels(self) -> list[int]:
        """Output channels that count as foreground (all regions; classes except 0)."""
        return list(range(self.out_channels)) if self.multilabel else list(range(1, self.out_channels))

    @property
    def in_channels(self) -> int:
        """Image channels (one per modality)."""
        return len(self.modalities)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | DictConfig) -> "DatasetPreset":
        """Validate the ``dataset`` section of a config.

        Raises:
            ValueError: a key is missing or inconsistent; the message names the key.
        """
        # A plain copy (the caller's config is left as it is); plain containers all the way down
        # (a dict may still hold ListConfig values).
        given = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        given = {k: v for k, v in given.items() if k not in _RUN_KEYS}
        if "roi_size" in given and "image_size" not in given:  # its name before image_size (older checkpoints)
            given["image_size"] = given.pop("roi_size")
        # Keys the preset leaves out take the defaults of segmentation_default.yaml.
        raw = OmegaConf.to_container(OmegaConf.merge(segmentation_preset_defaults(), given), resolve=True)
        required = ("name", "modalities", "loss", "spacing", "orientation", "intensity", "image_size")
        missing = [k for k in required if raw[k] in (None, "???")]
        if missing:
            raise ValueError(f"Dataset preset lacks {', '.join('dataset.' + k for k in missing)}; "
                             "see dinov2/configs/datasets/*.yaml for complete examples.")
        modalities = tuple(str(m) for m in raw["modalities"])
        if not modalities:
            raise ValueError("dataset.modalities must name at least one modality")
        loss = raw["loss"]
        if loss not in LOSSES:
            raise ValueError(f"dataset.loss must be one of {LOSSES}, got '{loss}'")
        classes, regions = raw["classes"], raw["regions"]
        if (classes is None) == (regions is None):
            raise ValueError("A dataset preset needs exactly one of dataset.classes (multi-class) and "
                             "dataset.regions (multi-label)")
        if loss == "dice_ce" and classes is None:
            raise ValueError("dataset.loss=dice_ce (softmax over classes) needs dataset.classes")
        if loss == "dice_sigmoid" and regions is None:
            raise ValueError("dataset.loss=dice_sigmoid (one sigmoid per region) needs dataset.regions")
        if classes is not None:
            classes = tuple(str(c) for c in classes)
            if len(classes) < 2:
                raise ValueError(f"dataset.classes needs background plus at least one class, got {list(classes)}")
        if regions is not None:
            if not isinstance(regions, Mapping) or not regions:
                raise ValueError("dataset.regions must map region names to lists of label values")
            regions = {str(k): tuple(int(v) for v in (vals if isinstance(vals, (list, tuple)) else [vals]))
                       for k, vals in regions.items()}
            if any(not v or min(v) < 1 for v in regions.values()):
                raise ValueError(f"dataset.regions must list positive label values per region, got {regions}")
        remap = {int(k): int(v) for k, v in (raw["remap"] or {}).items()}
        intensity = intensity_settings(raw["intensity"], str(raw["name"]))
        roi = _triple(raw["image_size"], "image_size", int)
        if min(roi) < 1:
            raise ValueError(f"dataset.image_size must be positive, got {roi}")
        spacing = _triple(raw["spacing"], "spacing", float)
        scale = float(raw["resize_scale"])
        if scale <= 0:
            raise ValueError(f"dataset.resize_scale (--resize-scale) must be > 0, got {scale}")
        spacing = tuple(s / scale for s in spacing)
        sampling = dict(raw["sampling"])
        if sampling["pos"] < 0 or sampling["neg"] < 0 or sampling["pos"] + sampling["neg"] == 0 or sampling["num_samples"] < 1:
            raise ValueError(f"dataset.sampling needs pos, neg >= 0 (not both 0) and num_samples >= 1, got {sampling}")
        augment = dict(raw["augment"])
        return cls(
            name=str(raw["name"]), datalist=str(raw["datalist"]), modalities=modalities,
            classes=classes, regions=regions, remap=remap, loss=loss, spacing=spacing,
            orientation=str(raw["orientation"]), intensity=intensity,
            crop_foreground=bool(raw["crop_foreground"]), roi_size=roi,
            sampling={k: int(v) for k, v in sampling.items()},
            augment={k: float(v) for k, v in augment.items()}, raw=raw,
            **_nnunet_keys(raw, classes, regions), **_loss_keys(raw),
        )


DICE_VARIANTS = ("dice", "squared", "jaccard")


def _loss_keys(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``loss_weights`` (non-negative, not all zero) and ``dice_variant``, checked.

    Raises:
        ValueError: names the key and what is wrong.
    """
    weights = {k: float(v) for k, v in dict(raw["loss_weights"]).items()}
    if set(weights) != {"dice", "ce"} or min(weights.values()) < 0 or not any(weights.values()):
        raise ValueError(f"dataset.loss_weights needs dice and ce >= 0, not both 0, got {weights}")
    variant = str(raw["dice_variant"])
    if variant not in DICE_VARIANTS:
        raise ValueError(f"dataset.dice_variant must be one of {DICE_VARIANTS}, got '{variant}'")
    return {"loss_weights": weights, "dice_variant": variant}


def _nnunet_keys(raw: Mapping[str, Any], classes: tuple | None, regions: dict | None) -> dict[str, Any]:
    """``regions_class_order`` (one label value per region) and ``ignore_label`` (not a class or region value), checked.

    Raises:
        ValueError: names the key and what is wrong.
    """
    order, ignore = raw.get("regions_class_order"), raw.get("ignore_label")
    if order is not None:
        if regions is None or len(order) != len(regions):
            raise ValueError(f"dataset.regions_class_order needs dataset.regions and one label value per region, "
                             f"got {order}")
        order = tuple(int(v) for v in order)
    if ignore is not None:
        ignore = int(ignore)
        used = set(range(len(classes))) if classes is not None else {v for vals in regions.values() for v in vals}
        if ignore <= 0 or ignore in used:
            raise ValueError(f"dataset.ignore_label {ignore} must be a positive label value that is no class or "
                             f"region value ({sorted(used)})")
    return {"regions_class_order": order, "ignore_label": ignore}


def region_decoding_table(regions: Mapping[str, tuple[int, ...]],
                          class_order: Sequence[int] | None = None) -> np.ndarray:
    """Label value for every on/off combination of the region channels (for writing label maps).

    With ``class_order`` (nnU-Net's ``regions_class_order``), the regions are painted in order,
    each with its value over the earlier ones: the value of the last region that is on. Else a
    voxel inside regions ``S`` and outside the others gets the label value common to all of
    ``S`` and to none of the others (BraTS: WT+TC+ET → 4, WT+TC → 1, WT → 2). When no single value
    fits (an inconsistent combination such as ET without WT), the value shared by the most
    regions of ``S`` is taken (ties: the larger value).

    Returns:
        ``(2**K,)`` int array indexed by ``sum_k on_k * 2**k``.
    """
    names = list(regions)
    if class_order is not None:
        return _painting_table(class_order)
    sets = [set(regions[n]) for n in names]
    table = np.zeros(2 ** len(names), dtype=np.int64)
    for combo in itertools.product([0, 1], repeat=len(names)):
        index = sum(on << k for k, on in enumerate(combo))
        inside = [s for s, on in zip(sets, combo) if on]
        if not inside:
            continue
        outside = set().union(*[s for s, on in zip(sets, combo) if not on])
        candidates = set.intersection(*inside) - outside
        if len(candidates) == 1:
            table[index] = candidates.pop()
        else:
            values = sorted(set().union(*inside))
            table[index] = max(values, key=lambda v: (sum(v in s for s in inside), v))
    return table


def _painting_table(class_order: Sequence[int]) -> np.ndarray:
    """``(2**K,)`` table: the value of the last region on (0 when none), indexed like :func:`region_decoding_table`."""
    table = np.zeros(2 ** len(class_order), dtype=np.int64)
    for index in range(1, len(table)):
        table[index] = class_order[index.bit_length() - 1]  # the highest set bit is the last region on
    return table
