"""nnU-Net's ``dataset.json``: channels, labels (classes or regions, the ignore label), file ending.

Keys read (nnU-Net v2's raw format): ``channel_names`` (``{"0": "T1", "1": "FLAIR"}``; the v1
spelling ``modality`` is accepted), ``labels`` (``{"background": 0, "liver": 1}``, or regions
``{"background": 0, "whole_tumor": [1, 2, 3], ...}`` with ``regions_class_order``),
``numTraining`` and ``file_ending``. Every problem is a :class:`~..format.Problem` naming the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..format import Problem

IGNORE_NAME = "ignore"
# Our readers take NIfTI; nnU-Net's other formats (.mha, .nrrd, .png, .tif) would need converting.
SUPPORTED_ENDINGS = (".nii.gz", ".nii")
HINT_META = "fix dataset.json (nnU-Net raw format: channel_names, labels, numTraining, file_ending)"


@dataclass(frozen=True)
class NnunetLabels:
    """The ``labels`` of a dataset.json.

    Attributes:
        values: label name -> label value(s), in dataset.json order; background and ignore included.
        region_based: some label lists several values (sigmoid regions instead of softmax classes).
        regions_class_order: for regions, the value painted for each non-background region, in order.
        ignore: the value of the label named ``ignore`` (unannotated voxels), or None.
    """

    values: dict[str, tuple[int, ...]]
    region_based: bool
    regions_class_order: tuple[int, ...] | None
    ignore: int | None

    @property
    def allowed(self) -> set[int]:
        """Every value a label map may hold (background, classes or region members, ignore)."""
        return {v for values in self.values.values() for v in values}

    @property
    def foreground(self) -> dict[str, tuple[int, ...]]:
        """Label name -> values, without background (value 0) and the ignore label."""
        return {k: v for k, v in self.values.items() if k != IGNORE_NAME and v != (0,)}


@dataclass(frozen=True)
class NnunetMeta:
    """What dataset.json says; ``labels`` is None when its ``labels`` cannot be used."""

    name: str
    channels: tuple[str, ...]
    labels: NnunetLabels | None
    file_ending: str
    num_training: int | None


def _problem(key: str, path: Path, reason: str, hint: str = HINT_META) -> Problem:
    return Problem(f"dataset.json {key}", str(path), reason, hint)


def _as_values(value: Any) -> tuple[int, ...] | None:
    """A label's value(s) as a tuple of ints; None when not an int or a non-empty list of ints."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return None
    return tuple(values)


def _consecutive_problem(values: dict[str, tuple[int, ...]], ignore: int | None, path: Path) -> list[Problem]:
    """nnU-Net needs label values 0..K-1 without gaps, and the ignore label above all of them."""
    used = sorted({v for name, vals in values.items() if name != IGNORE_NAME for v in vals})
    problems = []
    if used != list(range(len(used))) or 0 not in used:
        problems.append(_problem("labels", path, f"label values {used} are not consecutive from 0 (background)",
                                 "number the labels 0, 1, 2, ... without gaps, background = 0"))
    if ignore is not None and used and ignore <= used[-1]:
        problems.append(_problem("labels", path, f"the ignore label ({ignore}) is not above every other label "
                                 f"(highest {used[-1]})", "give 'ignore' the highest label value"))
    return problems


def _class_order(meta: dict, values: dict[str, tuple[int, ...]], path: Path) -> tuple[tuple[int, ...] | None, list]:
    """``regions_class_order``: one label value per non-background, non-ignore region."""
    regions = [n for n, v in values.items() if n != IGNORE_NAME and v != (0,)]
    order = meta.get("regions_class_order")
    if not isinstance(order, list) or not all(isinstance(v, int) for v in order) or len(order) != len(regions):
        reason = (f"region-based labels need regions_class_order: a list of {len(regions)} label values, one per "
                  f"region {regions}; got {order!r}")
        return None, [_problem("regions_class_order", path, reason)]
    return tuple(order), []


def parse_labels(meta: dict, path: Path) -> tuple[NnunetLabels | None, list[Problem]]:
    """``labels`` (and ``regions_class_order``) of dataset.json, checked.

    Returns:
        ``(labels or None, problems)``: the labels whenever every value reads, with their problems
        (gaps, ignore not highest, a missing class order) listed too.
    """
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        return None, [_problem("labels", path, f"'labels' must map names to values, got {raw!r}")]
    values, problems = {}, []
    for name, value in raw.items():
        parsed = _as_values(value)
        if parsed is None:
            reason = f"value {value!r} is neither an integer nor a list of them"
            problems.append(_problem(f"labels.{name}", path, reason))
        else:
            values[str(name)] = parsed
    if problems:
        return None, problems
    ignore = values.get(IGNORE_NAME)
    if ignore is not None and len(ignore) != 1:
        return None, [_problem("labels.ignore", path, f"the ignore label must be one integer, got {list(ignore)}")]
    ignore_value = ignore[0] if ignore else None
    region_based = any(len(v) > 1 for v in values.values()) or "regions_class_order" in meta
    order = None
    if region_based:
        order, found = _class_order(meta, values, path)
        problems += found
    problems += _consecutive_problem(values, ignore_value, path)
    return NnunetLabels(values, region_based, order, ignore_value), problems


def _parse_channels(meta: dict, path: Path) -> tuple[tuple[str, ...], list[Problem]]:
    """Channel names by index 0..C-1 (``channel_names``, or v1's ``modality``)."""
    raw = meta.get("channel_names", meta.get("modality"))
    if not isinstance(raw, dict) or not raw:
        return (), [_problem("channel_names", path, f"'channel_names' must map '0', '1', ... to names, got {raw!r}")]
    keys = sorted(raw, key=lambda k: int(k) if str(k).isdigit() else -1)
    if [str(k) for k in keys] != [str(i) for i in range(len(keys))]:
        return (), [_problem("channel_names", path, f"channel indices {list(raw)} are not 0..{len(raw) - 1}")]
    return tuple(str(raw[k]) for k in keys), []


def _parse_count(meta: dict, path: Path) -> tuple[int | None, list[Problem]]:
    count = meta.get("numTraining")
    if count is None:
        return None, []
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        return None, [_problem("numTraining", path, f"numTraining must be a number of cases, got {count!r}")]
    return count, []


def _parse_ending(meta: dict, path: Path) -> tuple[str, list[Problem]]:
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in SUPPORTED_ENDINGS:
        hint = "convert the images and labels to NIfTI (.nii.gz) and set file_ending to \".nii.gz\""
        return ".nii.gz", [_problem("file_ending", path, f"file_ending {ending!r} is not NIfTI", hint)]
    return ending, []


def read_meta(root: Path) -> tuple[NnunetMeta | None, list[Problem]]:
    """Read and check ``root/dataset.json``.

    Returns:
        ``(meta, problems)``; ``meta`` is None when the file is missing, not JSON, or has no
        usable ``channel_names`` (nothing else can be checked then).
    """
    path = root / "dataset.json"
    if not path.is_file():
        return None, [Problem("dataset.json", str(path), "file not found",
                              "pass the DatasetXXX_Name folder of an nnU-Net raw dataset (it holds dataset.json)")]
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, [Problem("dataset.json", str(path), f"not valid JSON ({exc})", HINT_META)]
    if not isinstance(meta, dict):
        return None, [Problem("dataset.json", str(path), "not a JSON object", HINT_META)]
    channels, problems = _parse_channels(meta, path)
    labels, found = parse_labels(meta, path)
    count, more = _parse_count(meta, path)
    ending, last = _parse_ending(meta, path)
    problems += found + more + last
    name = str(meta.get("name") or root.name)
    return (NnunetMeta(name, channels, labels, ending, count) if channels else None), problems
