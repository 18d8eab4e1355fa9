"""Which packaged files the evidence evaluates on, and whether a pretraining run saw them.

The evidence is only evidence if the pretraining never saw the evaluation volumes. The two
templates it evaluates on (:data:`EVALUATION_FILES`, the volumes of
:data:`dinov2.data.classification_sample.TEMPLATES`) are FSL MNI152 templates; the other FSL
MNI152 files shipped by the sample-data packages (:data:`NEAR_DUPLICATE_FILES`) are the same
population average at another resolution or skull-stripped, so pretraining on them is as good as
pretraining on the evaluation data. Build a pretraining datalist without all of them
(:func:`held_out_files`), and the check below stays quiet.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dinov2.sample_data.classification import TEMPLATES
from dinov2.sample_data.packages import installed_files
from dinov2.sample_data.pretraining import FSL_MNI152_FILES

logger = logging.getLogger(__name__)

# (package, path inside it) of the volumes the evidence cuts its patches and windows from.
EVALUATION_FILES: tuple[tuple[str, str], ...] = tuple(TEMPLATES.values())
# Other FSL MNI152 (6th generation) T1 templates: same anatomy, other resolution or skull-stripped.
# The list lives with the sample data, which builds pretraining datalists without them.
NEAR_DUPLICATE_FILES: tuple[tuple[str, str], ...] = tuple(f for f in FSL_MNI152_FILES if f not in EVALUATION_FILES)


def held_out_files(include_near_duplicates: bool = True) -> list[Path]:
    """Absolute paths of the held-out files that exist in the installed packages.

    Args:
        include_near_duplicates: also list :data:`NEAR_DUPLICATE_FILES` (what a pretraining
            datalist must leave out), not only :data:`EVALUATION_FILES`.

    Returns:
        Resolved paths, evaluation files first; files of packages not installed are left out.
    """
    return installed_files(EVALUATION_FILES + (NEAR_DUPLICATE_FILES if include_near_duplicates else ()))


def _datalist_images(path: Path) -> list[Path]:
    """Resolved image paths of a pretraining (list) or finetuning (dict of splits) datalist."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if isinstance(data, dict):  # a finetuning datalist: every split's entries
        data = [e for v in data.values() if isinstance(v, list) for e in v]
    entries = data if isinstance(data, list) else []
    images: list[Path] = []
    for entry in entries:
        image = entry.get("image") if isinstance(entry, Mapping) else entry
        for value in image if isinstance(image, list) else [image]:
            if isinstance(value, str) and value:
                # Relative paths are relative to the datalist's folder (dinov2.data.datalist's rule).
                candidate = Path(os.path.expanduser(value))
                images.append((candidate if candidate.is_absolute() else path.parent / candidate).resolve())
    return images


def pretraining_overlap(config: Mapping[str, Any] | None, held_out: list[Path] | None = None) -> dict:
    """Whether the pretraining datalist named in a teacher's config lists any held-out file.

    Args:
        config: the teacher checkpoint's embedded config (``train.datalist`` is read), or None.
        held_out: files to look for (default :func:`held_out_files`).

    Returns:
        ``{"datalist": str | None, "checked": bool, "note": str, "held_out_in_datalist": [str]}``;
        ``checked`` is False when there is no config, no ``train.datalist`` or the file is gone
        (then nobody can tell, and ``note`` says why).
    """
    held_out = held_out_files() if held_out is None else held_out
    train = config.get("train") if isinstance(config, Mapping) else None
    value = train.get("datalist") if isinstance(train, Mapping) else None
    result = {"datalist": None, "checked": False, "note": "", "held_out_in_datalist": []}
    if not isinstance(value, str) or not value or value == "???":
        result["note"] = "the checkpoint holds no train.datalist: whether it saw the evaluation data is unknown"
        return result
    # A relative path is taken from the current folder (where training would have been started).
    path = Path(os.path.expanduser(value)).resolve()
    result["datalist"] = str(path)
    if not path.is_file():
        result["note"] = f"the pretraining datalist {path} is not on this machine: overlap unknown"
        return result
    try:
        images = set(_datalist_images(path))
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        result["note"] = f"the pretraining datalist {path} could not be read ({exc}): overlap unknown"
        return result
    result["checked"] = True
    result["held_out_in_datalist"] = [str(p) for p in held_out if p in images]
    result["note"] = ("the evaluation data (or a near-duplicate) was in the pretraining datalist"
                      if result["held_out_in_datalist"] else "no held-out file in the pretraining datalist")
    return result
