"""Writing datalists (atomically, absolute or relative paths) and the report of skipped files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from dinov2.data.skipped_report import REPORT_NAME, write_skipped_tsv
from dinov2.utils.io import atomic_write_text

from .format import SPLITS, Skipped, map_paths


def write_skipped_report(skipped: Sequence[Skipped], datalist_path: str | os.PathLike) -> Path | None:
    """Write every skipped file and reason to ``<datalist>.skipped.tsv``; ``None`` if nothing was skipped
    (a report left by an earlier build of this datalist is then removed: it would describe another list)."""
    return write_skipped_tsv(f"{os.fspath(datalist_path)}.{REPORT_NAME}", ("path", "reason"),
                             [(s.path, s.reason) for s in skipped], remove_stale=True)


def write_datalist(data: list | dict, path: str | os.PathLike, relative: bool = False) -> Path:
    """Write a pretraining list or finetuning dict as JSON.

    Args:
        data: pretraining entries (list) or finetuning dict; image/label paths absolute.
        path: output JSON file (parent folders are created).
        relative: write image/label paths relative to the datalist's folder, so the datalist
            and the data can move together.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()

    def convert(p: str) -> str:
        return os.path.relpath(os.path.abspath(p), base) if relative else os.path.abspath(p)

    if isinstance(data, list):
        payload: Any = [map_paths(e, convert) for e in data]
    elif isinstance(data, dict):
        payload = {k: ([map_paths(e, convert) for e in v] if k in SPLITS else v) for k, v in data.items()}
    else:
        raise ValueError(f"A datalist is a list (pretraining) or a dict (finetuning), got {type(data).__name__}.")
    return atomic_write_text(path, json.dumps(payload, indent=2) + "\n")  # never half a datalist
