"""MONAI image readers for the DICOM inputs MONAI's own readers get wrong.

MONAI 1.6's ``PydicomReader`` stacks a series folder in ``InstanceNumber`` order (often reversed
along the body, or meaningless after anonymisation), stacks every series of a folder into one
volume, ignores missing slices, and treats a multi-frame DICOM file as a DICOM SEG (a classic or
enhanced multi-frame image comes back as ``(rows, frames, columns)`` with a wrong slice spacing).
:class:`DicomSeriesReader` (:func:`~dinov2.data.dicom_series.load_series`) and
:class:`MultiFrameDicomReader` (:func:`~dinov2.data.image_io.load_dicom_multiframe`) read those
inputs with the datalist headers' axis order and RAS affine, and leave every other file to MONAI.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
from monai.data import ImageReader
from monai.utils import ensure_tuple

from .dicom_series import load_series, split_series_choice
from .image_io import VolumeHeader, is_multiframe, load_dicom_multiframe

_REFUSALS = ("MultiFrameDicomReader: unable to load", "DicomSeriesReader: unable to load")


class _DropOurRefusals(logging.Filter):
    """MONAI's ``LoadImage`` tries every reader given to it and logs each refusal at INFO; ours
    refuse every input that is not theirs by design, so those lines are noise that reads like a
    failure ("unable to load ...nii.gz"). Other readers' messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_REFUSALS)


logging.getLogger("LoadImage").addFilter(_DropOurRefusals())


def volume_meta(shape: Sequence[int], affine: np.ndarray | None, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict:
    """MONAI metadata of an ``(X, Y, Z)`` array: RAS ``affine``, or ``diag(spacing)`` when the
    DICOM has no orientation (the voxel size is known, the direction is not)."""
    affine = np.diag([*spacing[:3], 1.0]) if affine is None else np.asarray(affine, dtype=np.float64)
    return {
        "affine": affine.copy(),
        "original_affine": affine.copy(),
        "spatial_shape": np.asarray(shape[:3]),
        "original_channel_dim": "no_channel",
        "space": "RAS",
    }


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
        return array, volume_meta(array.shape, np.eye(4) if affine is None else affine)


class DicomSeriesReader(ImageReader):
    """Reads a DICOM series folder (or ``FOLDER::SERIES``) as float32 ``(X, Y, Z)`` with the header's
    RAS affine: slices sorted along the normal, modality rescale applied (see
    :mod:`dinov2.data.dicom_series`)."""

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        files = ensure_tuple(filename)
        return len(files) == 1 and split_series_choice(files[0])[0].is_dir()

    def read(self, data: Sequence[str] | str, **kwargs) -> tuple[np.ndarray, VolumeHeader] | Exception:
        """The voxels and header, or the error that stopped them (raised by :meth:`get_data`).

        ``LoadImage`` hands an input to the next reader when ``read`` raises, and MONAI's
        ``PydicomReader`` would then stack a folder with missing slices or several series
        without a word; returning the error makes it the final answer for series folders.
        """
        if not self.verify_suffix(data):
            raise ValueError("not a DICOM series folder")  # the next reader decides
        try:
            return load_series(ensure_tuple(data)[0])
        except Exception as exc:  # noqa: BLE001 - re-raised in get_data, outside LoadImage's reader loop
            return exc

    def get_data(self, img: tuple[np.ndarray, VolumeHeader] | Exception) -> tuple[np.ndarray, dict[str, Any]]:
        """Array ``(X, Y, Z)`` and MONAI metadata (affine in RAS, no channel dimension)."""
        if isinstance(img, Exception):
            raise img
        array, header = img
        return array, volume_meta(array.shape, header.affine, header.spacing)


def image_readers() -> list[ImageReader]:
    """Readers to pass as ``LoadImaged(reader=...)``. ``LoadImage`` tries the given readers last
    one first, all before MONAI's defaults: series folders, then multi-frame files."""
    return [MultiFrameDicomReader(), DicomSeriesReader()]

