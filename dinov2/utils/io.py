"""Writing files safely: a ``torch.save`` and a text write that never leave a half-written file behind.

Every checkpoint writer (teacher export, training state, finetuned segmentation model, resumable
finetuning state) goes through :func:`atomic_torch_save`; small text outputs that are rewritten
whole (the metrics log after a resume, datalists, skipped-inputs reports) through
:func:`atomic_write_text`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` that never leaves a half-written file at ``path``.

    The object is written to a temporary file in the same folder, flushed and fsynced, then
    moved over ``path`` with ``os.replace`` (atomic on POSIX); a crash leaves either the old
    file or the new one. The folder is created if needed.

    Args:
        obj: anything ``torch.save`` accepts.
        path: destination file.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # persist the rename itself; not every filesystem lets a folder be opened for this
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # fsync of a directory is unsupported on some filesystems; the file itself is synced
    finally:
        os.close(dir_fd)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` so that a crash leaves either the old file or the new one.

    The text goes to a hidden temporary file in the same folder (opened with ``open``, so it gets
    the permissions of the user's umask, unlike ``mkstemp``'s 0600), is flushed and fsynced, then
    moved over ``path`` with ``os.replace``. On any failure the temporary file is removed and an
    earlier ``path`` is left as it was. The folder is created if needed.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
