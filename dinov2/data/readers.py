"""MONAI image readers for formats MONAI's own readers get wrong.

MONAI 1.6's ``PydicomReader`` treats a multi-frame DICOM file as a DICOM SEG and returns a
classic or enhanced multi-frame image as ``(rows, frames, columns)`` with a wrong slice spacing.
:class:`MultiFrameDicomReader` reads such files with :func:`~dinov2.data.image_io.
load_dicom_multiframe` (the same axis convention and affine as the datalist headers) and leaves
every other file to MONAI's readers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
from monai.data import ImageReader
from monai.utils import ensure_tuple

from .image_io import is_multiframe, load_dicom_multiframe

_REFUSAL = "MultiFrameDicomReader: unable to load"


class _DropOurRefusals(logging.Filter):
    """MONAI's ``LoadImage`` tries every reader given to it and logs each refusal at INFO; ours
    refuses every file that is not a multi-frame DICOM by design, so those lines are noise that
    reads like a failure ("unable to load ...nii.gz"). Other readers' messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_REFUSAL)


logging.getLogger("LoadImage").addFilter(_DropOurRefusals())


class MultiFrameDicomReader(ImageReader):
    """Reads one multi-frame DICOM file as a ``(X, Y, Z)`` volume with its RAS affine."""

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        files = ensure_tuple(filename)
        if len(files) != 1 or not Path(files[0]).is_file():
            return False
        try:
            header = pydicom.dcmread(files[0], stop_before_pixels=True)
        except Exception:  # not DICOM: MONAI's other readers decide
            return False
        return is_multiframe(header)

    def read(self, data: Sequence[str] | str, **kwargs) -> tuple[np.ndarray, np.ndarray | None]:
        return load_dicom_multiframe(ensure_tuple(data)[0])

    def get_data(self, img: tuple[np.ndarray, np.ndarray | None]) -> tuple[np.ndarray, dict[str, Any]]:
        """Array ``(X, Y, Z)`` and MONAI metadata (affine in RAS, no channel dimension)."""
        array, affine = img
        affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        meta = {
            "affine": affine.copy(),
            "original_affine": affine.copy(),
            "spatial_shape": np.asarray(array.shape[:3]),
            "original_channel_dim": "no_channel",
            "space": "RAS",
        }
        return array, meta


def image_readers() -> list[ImageReader]:
    """Readers to pass as ``LoadImaged(reader=...)``: ours first, MONAI's defaults after them."""
    return [MultiFrameDicomReader()]
