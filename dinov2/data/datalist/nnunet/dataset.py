"""An nnU-Net raw dataset read in full: every inconsistency found at once, then the finetuning datalist.

:func:`read_nnunet_dataset` checks dataset.json and every case (:mod:`.cases`) and raises ONE
:class:`~..format.DatalistError` listing every problem; :func:`nnunet_datalist` then splits the
training cases (nnU-Net's ``splits_final.json`` fold, or a seeded fraction) and adds the test cases.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dinov2.data.image_io import VolumeHeader

from ..build import split_entries
from ..format import DatalistError, Problem
from .cases import check_geometry, label_value_problems, pair_cases, scan_images, scan_labels
from .meta import NnunetLabels, read_meta

logger = logging.getLogger(__name__)

SPLITS_FILE = "splits_final.json"


@dataclass(frozen=True)
class NnunetDataset:
    """A checked nnU-Net raw dataset.

    Attributes:
        root: the ``DatasetXXX_Name`` folder.
        name: dataset.json's ``name``, else the folder name.
        channels: channel names by index.
        labels: the labels of dataset.json.
        training: ``{"image": [path per channel], "label": path, "name": case}`` of imagesTr, by case.
        test: the same for imagesTs (``label`` only when labelsTs exists).
        headers: case -> header of its channel 0 (training cases), for spacing and size statistics.
    """

    root: Path
    name: str
    channels: tuple[str, ...]
    labels: NnunetLabels
    training: list[dict]
    test: list[dict]
    headers: dict[str, VolumeHeader]


def _read_split(root: Path, images: str, labels: str, n_channels: int, ending: str,
                need_labels: bool) -> tuple[list[dict], list[Problem], int]:
    """Entries of one image folder (with its label folder when present, or required).

    Returns:
        ``(entries, problems, number of cases found)``: the count includes the cases at fault.
    """
    image_dir, label_dir = root / images, root / labels
    if not image_dir.is_dir():
        if not need_labels:
            return [], [], 0
        return [], [Problem(images, str(image_dir), "folder not found", f"an nnU-Net raw dataset has {images}/")], 0
    cases, problems = scan_images(image_dir, n_channels, ending)
    label_map = None
    if label_dir.is_dir():
        label_map, found = scan_labels(label_dir, ending)
        problems += found
    elif need_labels:
        problems.append(Problem(labels, str(label_dir), "folder not found", f"an nnU-Net raw dataset has {labels}/"))
        label_map = {}
    entries, found = pair_cases(cases, label_map, n_channels, (images, labels), ending)
    return entries, problems + found, len(cases)


def _check_cases(entries: Sequence[dict], folders: tuple[str, str], labels: NnunetLabels | None,
                 progress: bool) -> tuple[dict[str, VolumeHeader], list[Problem]]:
    """Geometry of every case, then every label map's values."""
    headers, problems = {}, []
    for entry in entries:
        header, found = check_geometry(entry, folders)
        problems += found
        if header is not None:
            headers[entry["name"]] = header
    labelled = [e for e in entries if "label" in e]
    if labels is not None and labelled:
        problems += label_value_problems(labelled, labels.allowed, folders[1], progress)
    return headers, problems


def read_nnunet_dataset(root: str | Path, progress: bool = True) -> NnunetDataset:
    """Read and check an nnU-Net raw dataset (``dataset.json``, ``imagesTr``, ``labelsTr``, ``imagesTs``).

    Raises:
        DatalistError: every problem at once (dataset.json keys, missing channel files, label
            values not in ``labels``, grids of channels or labels that differ, ``numTraining`` not
            matching, labels without image, images without label), each naming its file.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise DatalistError(root, [], summary=f"{root} is not a folder; pass an nnU-Net DatasetXXX_Name folder.")
    meta, problems = read_meta(root)
    if meta is None:
        raise _error(root, problems)
    n, ending = len(meta.channels), meta.file_ending
    training, found, n_cases = _read_split(root, "imagesTr", "labelsTr", n, ending, need_labels=True)
    test, more, _ = _read_split(root, "imagesTs", "labelsTs", n, ending, need_labels=False)
    problems += found + more
    if meta.num_training is not None and meta.num_training != n_cases:
        problems.append(Problem("dataset.json numTraining", str(root / "dataset.json"),
                                f"numTraining is {meta.num_training} but imagesTr holds {n_cases} case(s)",
                                "set numTraining to the number of training cases"))
    headers, found = _check_cases(training, ("imagesTr", "labelsTr"), meta.labels, progress)
    _, more = _check_cases(test, ("imagesTs", "labelsTs"), meta.labels, progress)
    problems += found + more
    if problems or meta.labels is None:
        raise _error(root, problems)
    return NnunetDataset(root, meta.name, meta.channels, meta.labels, training, test, headers)


def _error(root: Path, problems: list[Problem]) -> DatalistError:
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return DatalistError(root / "dataset.json", problems,
                         summary=f"nnU-Net dataset {root} has {count}; nothing was written. Fix them:")


def _fold(splits_path: Path, fold: int, names: set[str]) -> tuple[list[str], list[str]]:
    """Train and validation case names of fold ``fold`` of a ``splits_final.json``.

    Raises:
        DatalistError: not a list of ``{"train", "val"}``, no such fold, or unknown case names.
    """
    try:
        folds = json.loads(splits_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise DatalistError(splits_path, [], summary=f"{splits_path} is not readable JSON ({exc}).") from exc
    if not isinstance(folds, list) or not all(isinstance(f, dict) and {"train", "val"} <= set(f) for f in folds):
        raise DatalistError(splits_path, [], summary=f"{splits_path} must hold a list of {{\"train\": [...], "
                            "\"val\": [...]}, one per fold.")
    if not 0 <= fold < len(folds):
        raise DatalistError(splits_path, [], summary=f"--fold {fold}: {splits_path} has folds 0..{len(folds) - 1}.")
    chosen = folds[fold]
    unknown = sorted((set(chosen["train"]) | set(chosen["val"])) - names)
    if unknown:
        problem = Problem(f"fold {fold}", str(splits_path), f"cases not in imagesTr: {unknown[:10]}",
                          "use the splits_final.json of this dataset (nnU-Net_preprocessed/DatasetXXX_Name/)")
        raise DatalistError(splits_path, [problem])
    return list(chosen["train"]), list(chosen["val"])


def split_training(training: Sequence[dict], splits_path: Path | None, fold: int, split: Sequence[float],
                   seed: int) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """Training / validation entries: fold ``fold`` of ``splits_path``, else a seeded ``split``.

    Args:
        training: the training entries (with ``name``).
        splits_path: nnU-Net's ``splits_final.json``, or None.
        fold: the fold of ``splits_path`` to use.
        split: ``(train, validation)`` fractions summing to 1, without ``splits_path``.
        seed: seed of that split.

    Returns:
        ``({"training", "validation"}, meta)``; meta records the source of the split.
    """
    if splits_path is None:
        parts = split_entries(training, (float(split[0]), float(split[1]), 0.0), seed)
        return {"training": parts["training"], "validation": parts["validation"]}, {"split": list(split), "seed": seed}
    by_name = {e["name"]: e for e in training}
    train, val = _fold(splits_path, fold, set(by_name))
    left_out = sorted(set(by_name) - set(train) - set(val))
    if left_out:
        logger.warning("%d training case(s) are in neither split of fold %d and are left out: %s", len(left_out),
                       fold, ", ".join(left_out[:10]))
    out = {"training": [by_name[n] for n in sorted(train)], "validation": [by_name[n] for n in sorted(val)]}
    return out, {"splits_file": str(splits_path), "fold": fold}


def nnunet_datalist(dataset: NnunetDataset, splits_path: Path | None = None, fold: int = 0,
                    split: Sequence[float] = (0.8, 0.2), seed: int = 0) -> dict[str, Any]:
    """The finetuning datalist of a checked dataset (see :func:`split_training` for the arguments).

    Returns:
        ``{"training", "validation", "test", "nnunet_labels", "meta"}`` with absolute paths;
        entries ``{"image": [path per channel], "label": path, "name": case}``; test entries
        carry a ``label`` only when ``labelsTs`` exists; ``nnunet_labels`` is dataset.json's
        ``labels`` (name -> value(s)).
    """
    parts, meta = split_training(dataset.training, splits_path, fold, split, seed)
    labels = {name: list(v) if len(v) > 1 else v[0] for name, v in dataset.labels.values.items()}
    return {**parts, "test": list(dataset.test), "nnunet_labels": labels,
            "meta": {"source": "nnunet", "dataset": str(dataset.root), **meta}}
