"""The report of skipped inputs: one TSV writer for every command that leaves a bad file out.

Three kinds of job leave bad inputs out and list them: the pre-flight of a training run
(``<run>/skipped.tsv``: ``path``, ``reason``, ``where``), the datalist builder
(``<datalist>.skipped.tsv``: ``path``, ``reason``) and the prediction commands
(``<output>/skipped.tsv``: ``path``, ``reason``). Each keeps its columns; the file is written here.

The file is a header row, then one row per skipped input, tab-separated. A tab or line break in
a value (an exception message over several lines, an odd file name) would split a row, so each
run of whitespace holding one becomes a single space: ``cut``, ``awk`` and ``splitlines`` see one
row per input. A value holding a double quote is quoted the way Python's ``csv`` and pandas
read it back unchanged. The report is written under a temporary name and renamed: a
crash never leaves half a report.
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from dinov2.utils.io import atomic_write_text

REPORT_NAME = "skipped.tsv"

# Tab and every character str.splitlines() breaks a line at (csv only knows \r and \n).
_ROW_BREAKING = re.compile(r"\s*[\t\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]\s*")


def tsv_cell(value: object) -> str:
    """``value`` as one TSV cell: ``None`` -> ``""``; each whitespace run holding a tab or line
    break -> one space (other spaces kept, so a path with two spaces stays that path)."""
    return "" if value is None else _ROW_BREAKING.sub(" ", str(value))


def write_skipped_tsv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[object]], *,
                      remove_stale: bool = False) -> Path | None:
    """Write the report of skipped inputs at ``path``, atomically; nothing when no input was skipped.

    Args:
        path: the report file (its folder is created).
        header: the column names, e.g. ``("path", "reason")``.
        rows: one sequence of ``len(header)`` values per skipped input (any values; see :func:`tsv_cell`).
        remove_stale: with no rows, delete a report left at ``path`` by an earlier run, so the
            folder never shows failures of another run.

    Returns:
        The written path, or ``None`` when ``rows`` is empty.

    Raises:
        ValueError: a row without one value per column (a bug of the caller).
    """
    path = Path(path)
    rows = [[tsv_cell(v) for v in row] for row in rows]
    if not rows:
        if remove_stale and path.is_file():
            path.unlink(missing_ok=True)
        return None
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"A row of {path.name} has {len(row)} values for the {len(header)} columns "
                             f"{list(header)}.")
    text = io.StringIO()
    writer = csv.writer(text, delimiter="\t", lineterminator="\n")
    writer.writerow([tsv_cell(c) for c in header])
    writer.writerows(rows)
    return atomic_write_text(path, text.getvalue())
