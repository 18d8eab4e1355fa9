"""Loading datalists with validation: every bad entry found at once, before a job waits in a queue.

Loading with ``validate=True`` reads every header once and raises a single
:class:`~.format.DatalistError` that lists every bad entry (missing or unreadable files, wrong
dimensionality, stale shape/spacing, labels or modalities off the image grid, evaluation images
that are also training images), so a typo is found before a training job waits in a queue, not
hours into it.
"""

from __future__ import annotations

import json
import os
from dataclasses import astuple
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dinov2.data.dicom_series import volume_source
from dinov2.data.image_io import ImageHeaderError, VolumeHeader, read_header, same_grid

from .format import (
    HINT_ENTRY,
    HINT_LABEL_GRID,
    HINT_MODALITY_GRID,
    HINT_NDIM,
    HINT_NOT_FOUND,
    HINT_STALE,
    HINT_UNREADABLE,
    SPLITS,
    DatalistError,
    Problem,
    map_paths,
    resolve_path,
)


def progress_bar(iterable: Iterable, total: int, desc: str, enabled: bool):
    """A tqdm bar over files (elapsed time, rate, ETA); quiet when disabled or for tiny jobs."""
    return tqdm(iterable, total=total, desc=desc, unit="file", disable=not enabled or total < 2, leave=False)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        summary = f"Datalist file not found: {path}. Build one with python -m dinov2.data.datalist."
        raise DatalistError(path, [], summary=summary)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise DatalistError(
            path,
            [],
            summary=f"Datalist {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "fix the file or rebuild it.",
        ) from exc
    except UnicodeDecodeError as exc:
        raise DatalistError(path, [], summary=f"Datalist {path} is not UTF-8 text JSON: {exc}") from exc


def _header(path: str, cache: dict) -> VolumeHeader | ImageHeaderError:
    if path not in cache:
        try:
            cache[path] = read_header(path)
        except ImageHeaderError as exc:
            cache[path] = exc
    return cache[path]


def _header_problem(where: str, path: str, result: VolumeHeader | ImageHeaderError) -> Problem | None:
    if isinstance(result, ImageHeaderError):
        if not volume_source(path).exists():  # FOLDER::SERIES: the folder
            return Problem(where, path, "file not found", HINT_NOT_FOUND)
        if Path(path).is_file() and Path(path).stat().st_size == 0:
            return Problem(where, path, "the file is empty (0 bytes)", "copy it again, or remove the entry")
        from dinov2.data.validation import explain_read_error  # noqa: PLC0415 - imports MONAI, only needed here

        return Problem(where, path, f"header unreadable: {explain_read_error(result) or result.reason}", HINT_UNREADABLE)
    if result.ndim not in (3, 4):
        return Problem(where, path, f"{result.ndim}D volume of shape {list(result.shape)}", HINT_NDIM)
    return None


def check_finetune_entry(entry: Any, where: str, base: Path, label_required: bool, cache: dict) -> list[Problem]:
    """Every problem of one finetuning entry (files, dimensionality, grids, label); ``cache`` maps path -> header."""
    if not isinstance(entry, dict) or "image" not in entry:
        return [Problem(where, None, f"entry is {type(entry).__name__}, not an object with an 'image' key", HINT_ENTRY)]
    image = entry["image"]
    images = image if isinstance(image, list) else [image]
    if not images or not all(isinstance(p, str) and p for p in images):
        return [Problem(f"{where}.image", None, "'image' must be a path or a non-empty list of paths", HINT_ENTRY)]
    problems, headers = [], []
    for k, rel in enumerate(images):
        path = resolve_path(rel, base)
        spot = f"{where}.image" + (f"[{k}]" if isinstance(image, list) else "")
        result = _header(path, cache)
        problem = _header_problem(spot, path, result)
        if problem:
            problems.append(problem)
        else:
            headers.append((spot, result))
    for spot, header in headers[1:]:
        equal, why = same_grid(headers[0][1], header)
        if not equal:
            reason = f"modality grid differs from {headers[0][0]}: {why}"
            problems.append(Problem(spot, str(header.path), reason, HINT_MODALITY_GRID))
    if "label" not in entry:
        if label_required:
            hint = "add a label path or class index, or move the entry to 'test'"
            problems.append(Problem(f"{where}.label", None, "entry has no 'label'", hint))
        return problems
    label = entry["label"]
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        reason = f"label {label!r} is neither a path nor an integer"
        problems.append(Problem(f"{where}.label", None, reason, HINT_ENTRY))
    elif isinstance(label, int):
        if label < 0:
            reason = f"class index {label} is negative"
            problems.append(Problem(f"{where}.label", None, reason, "class indices start at 0"))
    else:
        path = resolve_path(label, base)
        result = _header(path, cache)
        problem = _header_problem(f"{where}.label", path, result)
        if problem:
            problems.append(problem)
        elif result.ndim == 4 and result.shape[3] != 1:
            reason = f"label has {result.shape[3]} channels (shape {list(result.shape)}); expected one integer map"
            problems.append(Problem(f"{where}.label", path, reason, "store labels as one 3D map of class indices"))
        elif len(headers) == len(images):
            equal, why = same_grid(headers[0][1], result)
            if not equal:
                reason = f"label grid differs from the image {headers[0][1].path}: {why}"
                problems.append(Problem(f"{where}.label", path, reason, HINT_LABEL_GRID))
    return problems


def load_pretrain_datalist(path: str | os.PathLike, validate: bool = True, progress: bool = True,
                           collect: list[Problem] | None = None) -> list[dict]:
    """Load a pretraining datalist; fill in missing shape/spacing; optionally check every entry.

    Args:
        path: JSON list of ``{"image", "shape"?, "spacing"?}``.
        validate: read every header: the file exists and reads, is 3D/4D, and any stated
            shape/spacing still match the file.
        progress: show a progress bar while reading headers.
        collect: when a list, problems of the files (not of the datalist's structure) are
            appended to it, each with its entry's index in ``Problem.entry``, instead of raised;
            the returned list then keeps every entry, in order (a bad one without shape/spacing).

    Returns:
        Entries with absolute ``image`` paths and ``shape``/``spacing`` filled in.

    Raises:
        DatalistError: malformed JSON, or (one error for all) every bad entry.
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise DatalistError(
            path,
            [],
            summary=f"Pretraining datalist {path} must hold a JSON list of entries like "
            f'{{"image": "vol.nii.gz"}}, got {type(data).__name__}.',
        )
    base = path.parent.resolve()
    structural, problems, out, cache = [], [], [], {}
    with logging_redirect_tqdm():
        for i, entry in enumerate(progress_bar(data, len(data), "validating datalist", progress and validate)):
            where = f"[{i}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"]:
                reason = "entry is not an object with an 'image' path"
                hint = 'write entries like {"image": "vol.nii.gz"}'
                structural.append(Problem(where, None, reason, hint))
                continue
            resolved = dict(entry, image=resolve_path(entry["image"], base))
            if validate or "shape" not in entry or "spacing" not in entry:
                problem = _pretrain_entry_problem(where, resolved, entry, cache)
                if problem is not None:
                    problems.append(Problem(*problem, entry=i))
            out.append(resolved)
    if structural or (problems and collect is None):
        raise DatalistError(path, structural + problems)
    if collect is not None:
        collect.extend(problems)
    return out


def _pretrain_entry_problem(where: str, resolved: dict, entry: dict, cache: dict) -> tuple | None:
    """Check one entry's header against the file; fills ``resolved``'s shape/spacing when it reads.

    Returns:
        ``(where, path, reason, hint)`` of its problem, or None.
    """
    image = resolved["image"]
    result = _header(image, cache)
    problem = _header_problem(where, image, result)
    if problem:
        return problem.where, problem.path, problem.reason, problem.hint
    resolved.setdefault("shape", [int(s) for s in result.shape])
    resolved.setdefault("spacing", [round(float(s), 6) for s in result.spacing])
    if "shape" in entry and list(entry["shape"]) != list(result.shape):
        return where, image, f"stated shape {entry['shape']} but the file has {list(result.shape)}", HINT_STALE
    if "spacing" in entry and not _spacing_matches(entry["spacing"], result.spacing):
        actual = [round(s, 6) for s in result.spacing]
        return where, image, f"stated spacing {entry['spacing']} but the file has {actual}", HINT_STALE
    return None


def _spacing_matches(stated: Any, actual: Sequence[float]) -> bool:
    try:
        values = [float(v) for v in stated]
    except (TypeError, ValueError):
        return False
    return len(values) == len(actual) and bool(np.allclose(values, actual, rtol=1e-4, atol=1e-5))


def load_finetune_datalist(path: str | os.PathLike, validate: bool = True, progress: bool = True,
                           collect: list[Problem] | None = None) -> dict[str, Any]:
    """Load a finetuning datalist and (optionally) check every entry of every split.

    Checks: each image/modality/label exists and its header reads; images are 3D/4D; labels are
    one 3D map (or 4D with one channel) on the same grid (spatial shape and affine) as the image;
    all modalities of an entry share one grid; training/validation entries have a label; no
    validation/test image is also a training image.

    Args:
        path: JSON dict with ``training`` (required), ``validation`` and ``test`` lists.
        validate: read headers and run the checks above (structure is always checked).
        progress: show a progress bar while reading headers.
        collect: when a list, problems of the files (not of the datalist's structure) are
            appended to it, each with ``Problem.entry = (split, index)``, instead of raised; every
            entry is then returned, in order.

    Returns:
        The dict with absolute paths; missing ``validation``/``test`` become empty lists;
        other top-level keys are passed through.

    Raises:
        DatalistError: malformed JSON, or one error listing every bad entry.
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        summary = (
            f"Finetuning datalist {path} must be a JSON object with 'training'/'validation'/'test' lists, "
            f"got {type(data).__name__}."
        )
        raise DatalistError(path, [], summary=summary)
    base = path.parent.resolve()
    problems: list[Problem] = []
    if not isinstance(data.get("training"), list) or not data["training"]:
        hint = "add training entries; build one with python -m dinov2.data.datalist finetune"
        problems.append(Problem("training", None, "missing or empty 'training' list", hint))
    out: dict[str, Any] = {k: v for k, v in data.items() if k not in SPLITS}
    cache: dict = {}
    total = sum(len(data[s]) for s in SPLITS if isinstance(data.get(s), list))
    training_images: dict[str, str] = {}
    with logging_redirect_tqdm(), progress_bar(None, total, "validating datalist", progress and validate) as bar:
        for split in SPLITS:
            entries = data.get(split, [])
            if not isinstance(entries, list):
                problems.append(Problem(split, None, f"'{split}' is {type(entries).__name__}, not a list", HINT_ENTRY))
                out[split] = []
                continue
            resolved_split = []
            for i, entry in enumerate(entries):
                where = f"{split}[{i}]"
                bar.update(1)
                if validate:
                    found = check_finetune_entry(entry, where, base, split != "test", cache)
                    problems.extend(Problem(*astuple(p)[:4], entry=(split, i)) for p in found)
                elif not isinstance(entry, dict) or "image" not in entry:
                    problems.append(Problem(where, None, "entry is not an object with an 'image' key", HINT_ENTRY))
                    continue
                if not isinstance(entry, dict) or not isinstance(entry.get("image"), (str, list)):
                    continue
                resolved = map_paths(entry, lambda p: resolve_path(p, base) if isinstance(p, str) else p)
                key = json.dumps(resolved["image"])
                if split == "training":
                    training_images.setdefault(key, where)
                elif key in training_images:
                    reason = f"same image as {training_images[key]}: evaluation would measure memorisation"
                    hint = "remove the case from one of the two splits"
                    problems.append(Problem(where, str(resolved["image"]), reason, hint, entry=(split, i)))
                resolved_split.append(resolved)
            out[split] = resolved_split
    structural = [p for p in problems if p.path is None]
    if structural or (problems and collect is None):
        raise DatalistError(path, problems)
    if collect is not None:
        collect.extend(problems)
    return out


def load_datalist(path: str | os.PathLike, validate: bool = True, progress: bool = True) -> list[dict] | dict[str, Any]:
    """Load either kind of datalist: a JSON list is pretraining, a JSON object finetuning."""
    data = _read_json(Path(path))
    loader = load_pretrain_datalist if isinstance(data, list) else load_finetune_datalist
    return loader(path, validate=validate, progress=progress)
