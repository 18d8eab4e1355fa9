"""The two datalist formats and what can be wrong with an entry.

* pretraining: a JSON list of ``{"image": path, "shape": [X, Y, Z(, C)], "spacing": [sx, sy, sz]}``;
* finetuning: a JSON object ``{"training": [...], "validation": [...], "test": [...]}`` of
  ``{"image": path or [path per modality], "label": path or int}`` (Decathlon-compatible: other
  top-level keys such as ``"labels"`` or ``"description"`` are kept and ignored).

Relative paths in a datalist are resolved against the folder of the datalist file. A bad entry
is a :class:`Problem`; a datalist with problems raises one :class:`DatalistError` listing all of
them. A file or case left out while building a datalist is a :class:`Skipped`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from dinov2.utils.errors import UserError

SPLITS = ("training", "validation", "test")

HINT_NOT_FOUND = "check the path; relative paths are resolved against the datalist's folder"
HINT_UNREADABLE = "re-export the file as NIfTI (.nii.gz) or a DICOM series folder, or remove the entry"
HINT_NDIM = "volumes must be 3D (x, y, z) or 4D (x, y, z, channels); stack 2D slices into a series first"
HINT_STALE = (
    "rebuild the datalist (python -m dinov2.data.datalist pretrain ...) or delete shape/spacing to have them recomputed"
)
HINT_LABEL_GRID = (
    "resample the label onto the image grid with nearest-neighbour interpolation, e.g. "
    "nibabel.processing.resample_from_to(label, image, order=0)"
)
HINT_MODALITY_GRID = "register and resample every modality of a case onto one grid"
HINT_ENTRY = 'each entry must be an object like {"image": "case1.nii.gz", "label": "case1_seg.nii.gz"}'


@dataclass(frozen=True)
class Problem:
    """One bad datalist entry.

    Attributes:
        where: location in the datalist, e.g. ``"[12]"`` or ``"training[3].label"``.
        path: the file involved (absolute), or ``None`` for structural problems.
        reason: what is wrong.
        hint: how to fix it.
        entry: the entry at fault (its index, or ``(split, index)``), set where a caller may
            leave the entry out (``--skip-bad-inputs``); not part of equality.
    """

    where: str
    path: str | None
    reason: str
    hint: str
    entry: Any = field(default=None, compare=False)

    def __str__(self) -> str:
        target = f" '{self.path}'" if self.path else ""
        return f"{self.where}{target}: {self.reason}\n      hint: {self.hint}"


class DatalistError(UserError, ValueError):
    """A datalist that cannot be used; lists every problem found at once.

    Attributes:
        path: the datalist file.
        problems: every :class:`Problem` found.
    """

    def __init__(self, path: str | os.PathLike, problems: Sequence[Problem], summary: str | None = None):
        self.path = Path(path)
        self.problems = list(problems)
        count = f"{len(self.problems)} bad entr{'y' if len(self.problems) == 1 else 'ies'}"
        head = summary or f"Datalist {self.path} has {count}; fix them before training:"
        super().__init__("\n".join([head] + [f"  {p}" for p in self.problems]))


@dataclass(frozen=True)
class Skipped:
    """A file or case left out while building a datalist, and why."""

    path: str
    reason: str


def resolve_path(value: str, base: Path) -> str:
    """Absolute path of ``value`` (``~`` expanded), relative ones under ``base``."""
    path = Path(os.path.expanduser(value))
    return os.path.abspath(path if path.is_absolute() else base / path)


def map_paths(entry: dict, convert) -> dict:
    """A copy of ``entry`` with ``convert`` applied to its image path(s) and its label path."""
    out = dict(entry)
    image = entry.get("image")
    out["image"] = [convert(p) for p in image] if isinstance(image, list) else convert(image)
    if isinstance(entry.get("label"), str):
        out["label"] = convert(entry["label"])
    return out
