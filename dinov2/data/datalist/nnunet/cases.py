"""The cases of an nnU-Net raw dataset: files found by name, paired, and checked.

``imagesTr/CASE_XXXX<ending>`` holds channel ``XXXX`` (4 digits) of case ``CASE``;
``labelsTr/CASE<ending>`` its label map; ``imagesTs`` / ``labelsTs`` the same for test cases.
Checks: every channel file present, no unknown channel index, every image with a label and every
label with an image, each file's header readable, all channels and the label on one grid, and
every label value one of dataset.json's ``labels``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from dinov2.data.image_io import ImageHeaderError, VolumeHeader, read_header, same_grid, strip_image_suffix

from ..format import HINT_LABEL_GRID, HINT_MODALITY_GRID, HINT_UNREADABLE, Problem
from ..load import progress_bar

_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
HINT_NAMING = "name images CASE_XXXX{ending} (XXXX = 4-digit channel index) and labels CASE{ending}"


def split_channel_name(stem: str) -> tuple[str, int] | None:
    """``("CASE", 1)`` for an image stem ``CASE_0001``; None when it lacks the channel suffix."""
    match = _CHANNEL_FILE.match(stem)
    return (match["case"], int(match["channel"])) if match else None


def _files(folder: Path) -> list[Path]:
    """Visible files of ``folder`` (hidden ones such as ``.DS_Store`` are not the dataset's)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def scan_images(folder: Path, n_channels: int, ending: str) -> tuple[dict[str, dict[int, str]], list[Problem]]:
    """Case -> {channel index: path} for ``folder``'s ``CASE_XXXX<ending>`` files.

    Returns:
        ``(cases, problems)``: wrongly named files and channel indices beyond ``channel_names``
        are problems (and left out).
    """
    cases: dict[str, dict[int, str]] = {}
    problems = []
    for path in _files(folder):
        parsed = split_channel_name(path.name[: -len(ending)]) if path.name.endswith(ending) else None
        if parsed is None:
            problems.append(Problem(f"{folder.name}/{path.name}", str(path), f"not named CASE_XXXX{ending}",
                                    HINT_NAMING.format(ending=ending)))
        elif parsed[1] >= n_channels:
            reason = f"channel {parsed[1]:04d}, but dataset.json's channel_names has {n_channels} channel(s)"
            problems.append(Problem(f"{folder.name}/{parsed[0]}", str(path), reason,
                                    "remove the file or add the channel to channel_names"))
        else:
            cases.setdefault(parsed[0], {})[parsed[1]] = str(path.absolute())
    return cases, problems


def scan_labels(folder: Path, ending: str) -> tuple[dict[str, str], list[Problem]]:
    """Case -> label path for ``folder``'s ``CASE<ending>`` files; other files are problems."""
    labels, problems = {}, []
    for path in _files(folder):
        if path.name.endswith(ending):
            labels[path.name[: -len(ending)]] = str(path.absolute())
        else:
            problems.append(Problem(f"{folder.name}/{path.name}", str(path), f"not named CASE{ending}",
                                    HINT_NAMING.format(ending=ending)))
    return labels, problems


def pair_cases(images: dict[str, dict[int, str]], labels: dict[str, str] | None, n_channels: int,
               folders: tuple[str, str], ending: str) -> tuple[list[dict], list[Problem]]:
    """Entries ``{"image": [path per channel], "label"?: path, "name": case}`` sorted by case.

    Args:
        images: :func:`scan_images`' cases.
        labels: :func:`scan_labels`' labels, or None when the split has no label folder.
        n_channels: channels per case.
        folders: the image and label folder names, for messages (``("imagesTr", "labelsTr")``).
        ending: the file ending.

    Returns:
        ``(entries, problems)``: a case with a missing channel, an image without label or a label
        without image is a problem and left out.
    """
    entries, problems = [], []
    for case, channels in sorted(images.items()):
        missing = [f"{case}_{c:04d}{ending}" for c in range(n_channels) if c not in channels]
        if missing:
            problems.append(Problem(f"{folders[0]}/{case}", str(Path(channels[min(channels)]).parent / missing[0]),
                                    f"missing channel file(s) {missing}",
                                    "add every channel of the case, or remove it"))
        elif labels is not None and case not in labels:
            problems.append(Problem(f"{folders[0]}/{case}", channels[0], f"no label {folders[1]}/{case}{ending}",
                                    "add the label map, or remove the case's images"))
        else:
            entry = {"image": [channels[c] for c in range(n_channels)]}
            entries.append({**entry, "label": labels[case], "name": case} if labels is not None
                           else {**entry, "name": case})
    for case in sorted(set(labels or {}) - set(images)):
        problems.append(Problem(f"{folders[1]}/{case}", labels[case], f"label without image (no {folders[0]}/"
                                f"{case}_0000{ending})", "add the case's images, or remove the label"))
    return entries, problems


def _header(path: str, where: str, problems: list[Problem]) -> VolumeHeader | None:
    try:
        return read_header(path)
    except ImageHeaderError as exc:
        problems.append(Problem(where, path, f"header unreadable: {exc.reason}", HINT_UNREADABLE))
        return None


def check_geometry(entry: dict, folders: tuple[str, str]) -> tuple[VolumeHeader | None, list[Problem]]:
    """Headers of one case's channels and label: all readable and on the first channel's grid.

    Args:
        entry: ``{"image": [paths], "label"?: path, "name": case}``.
        folders: the image and label folder names, for messages.

    Returns:
        ``(first channel's header or None, problems)``.
    """
    problems: list[Problem] = []
    where = f"{folders[0]}/{entry['name']}"
    headers = [_header(p, where, problems) for p in entry["image"]]
    first = headers[0]
    for path, header in zip(entry["image"][1:], headers[1:]):
        equal, why = same_grid(first, header) if first and header else (True, "")
        if not equal:
            problems.append(Problem(where, path, f"channel grid differs from channel 0: {why}", HINT_MODALITY_GRID))
    if "label" in entry:
        where = f"{folders[1]}/{entry['name']}"
        label = _header(entry["label"], where, problems)
        equal, why = same_grid(first, label) if first and label else (True, "")
        if not equal:
            reason = f"label grid differs from the image: {why}"
            problems.append(Problem(where, entry["label"], reason, HINT_LABEL_GRID))
    return first, problems


def label_value_problems(entries: Sequence[dict], allowed: set[int], folder: str,
                         progress: bool = True) -> list[Problem]:
    """Read every label map in full: each value must be one of dataset.json's labels.

    Returns:
        One problem per label map holding other values (non-integers included), naming them.
    """
    problems = []
    for entry in progress_bar(entries, len(entries), "reading label maps", progress):
        try:
            values = np.unique(np.asanyarray(nib.load(entry["label"]).dataobj))
        except Exception as exc:  # noqa: BLE001 - a truncated file: reported with the others
            where = f"{folder}/{entry['name']}"
            problems.append(Problem(where, entry["label"], f"unreadable ({exc})", HINT_UNREADABLE))
            continue
        bad = [v.item() for v in values if v != np.round(v) or int(v) not in allowed]
        if bad:
            shown = ", ".join(f"{v:g}" for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
            problems.append(Problem(f"{folder}/{entry['name']}", entry["label"],
                                    f"label value(s) {shown} not in dataset.json's labels {sorted(allowed)}",
                                    "correct the label map, or add the value(s) to dataset.json's labels"))
    return problems


def group_channel_files(cases: Sequence[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """Regroup one-file cases named ``CASE_XXXX`` (nnU-Net's channel files) into ``(CASE, [file per channel])``.

    Args:
        cases: ``(name, files)`` pairs; cases of several files, named otherwise than their file, or
            without a channel suffix, pass.

    Returns:
        The cases, grouped ones at the place of their first file.

    Raises:
        ValueError: a case's channel indices are not 0, 1, ... without gaps (names its files).
    """
    groups: dict[str, dict[int, str]] = {}
    out: list = []
    for name, files in cases:
        # only names taken from the file itself: a datalist's "name" is already the case
        named_by_file = len(files) == 1 and strip_image_suffix(Path(files[0]).name) == name
        parsed = split_channel_name(name) if named_by_file else None
        if parsed is None:
            out.append((name, list(files)))
            continue
        if parsed[0] not in groups:
            groups[parsed[0]] = {}
            out.append(parsed[0])  # placeholder, filled below
        groups[parsed[0]][parsed[1]] = files[0]
    for case, channels in groups.items():
        if sorted(channels) != list(range(len(channels))):
            raise ValueError(f"Case {case} has channel files {sorted(channels)} ({', '.join(channels.values())}); "
                             "nnU-Net names need channels 0000, 0001, ... without gaps.")
    return [(c, [groups[c][i] for i in range(len(groups[c]))]) if isinstance(c, str) else c for c in out]
