"""DICOM series folders: which files form the volume, in which order, on which grid, and its voxels.

A folder of single-frame slices is one volume, in the convention of :mod:`.image_io`: array
``(columns, rows, slices)``, affine in RAS mm. Slices are sorted by their position along the slice
normal (``ImagePositionPatient`` projected on row cosine x column cosine), never by file name or
``InstanceNumber``, which scanners and anonymisers number either way; the slice spacing comes from
those positions, not from ``SliceThickness`` (the thickness of the excited slab, not the distance
between slices when slices overlap or leave gaps). Missing slices are an error, slightly uneven
spacing one warning (:func:`~dinov2.data.image_io.slice_step_from_positions`). Voxels get the
modality rescale (``RescaleSlope``/``RescaleIntercept``) and come back as float32.

A folder holding several series (``SeriesInstanceUID``) is refused, listing them, unless one is
chosen by writing the path as ``FOLDER::SERIES``: SERIES is the SeriesInstanceUID, a unique prefix
of it, or the SeriesNumber. :func:`split_series_choice` is the one place that syntax is parsed;
headers, the voxel reader, datalists, prediction and visualisation all accept it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from .image_io import (
    ImageHeaderError,
    VolumeHeader,
    _affine_ras,
    _fallback_slice_spacing,
    _float_list,
    _in_plane_spacing,
    is_dicom_candidate,
    is_image_dataset,
    is_multiframe,
    read_dicom_slice_headers,
    slice_step_from_positions,
    strip_image_suffix,
)

SERIES_SEPARATOR = "::"
# Slices whose orientation cosines differ by more than this are not one stack (e.g. a 3-plane localizer).
_ORIENTATION_TOLERANCE = 1e-4

Slices = Sequence[tuple[Path, Dataset]]


def split_series_choice(path: str | os.PathLike) -> tuple[Path, str | None]:
    """Split ``FOLDER::SERIES`` into ``(FOLDER, SERIES)``; any other path gives ``(path, None)``.

    A path that exists as written is never split (a file may have ``::`` in its name).
    """
    text = os.fspath(path)
    if SERIES_SEPARATOR not in text or os.path.exists(text):
        return Path(text), None
    folder, choice = text.rsplit(SERIES_SEPARATOR, 1)
    return Path(folder), choice.strip()


def volume_source(path: str | os.PathLike) -> Path:
    """The file or folder on disk behind a volume path (``FOLDER::SERIES`` -> ``FOLDER``)."""
    return split_series_choice(path)[0]


def volume_name(path: str | os.PathLike) -> str:
    """Name of a volume for output files: ``scan.nii.gz`` -> ``scan``, ``ct/`` -> ``ct``,
    ``ct::3`` -> ``ct_3`` (the choice keeps two series of one folder apart)."""
    folder, choice = split_series_choice(path)
    name = strip_image_suffix(folder.name)
    return f"{name}_{choice}" if choice else name


@dataclass(frozen=True)
class Series:
    """The slices of one SeriesInstanceUID in a folder.

    Attributes:
        uid: SeriesInstanceUID ("" when the slices have none).
        number: SeriesNumber as written, "" when absent.
        description: SeriesDescription, "" when absent.
        slices: ``(file, header dataset)`` pairs, in no particular order.
    """

    uid: str
    number: str
    description: str
    slices: tuple[tuple[Path, Dataset], ...]

    def describe(self) -> str:
        """One line for listings: UID, number, description, slice count."""
        number = f"SeriesNumber {self.number}, " if self.number else ""
        description = f"'{self.description}', " if self.description else ""
        return f"{self.uid or '(no SeriesInstanceUID)'} ({number}{description}{len(self.slices)} slices)"


def group_series(slices: Slices) -> list[Series]:
    """The series of ``slices``, grouped by SeriesInstanceUID, ordered by SeriesNumber then UID."""
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for file, dataset in slices:
        groups.setdefault(str(dataset.get("SeriesInstanceUID", "")), []).append((file, dataset))
    series = []
    for uid, members in groups.items():
        first = members[0][1]
        number = str(first.get("SeriesNumber", "") or "").strip()
        series.append(Series(uid, number, str(first.get("SeriesDescription", "") or "").strip(), tuple(members)))
    return sorted(series, key=lambda s: (not s.number.isdigit(), int(s.number) if s.number.isdigit() else 0, s.uid))


def _choice_fix(folder: Path, series: Sequence[Series]) -> str:
    example = next((s.number for s in series if s.number), series[0].uid)
    return (f"choose one by writing the path as FOLDER{SERIES_SEPARATOR}SERIES, where SERIES is the "
            f"SeriesInstanceUID, a unique prefix of it, or the SeriesNumber (e.g. '{folder}{SERIES_SEPARATOR}"
            f"{example}'), or move each series into its own folder")


def choose_series(folder: Path, series: Sequence[Series], choice: str | None) -> Series:
    """The series ``choice`` names (see :func:`split_series_choice`); the only one when ``choice`` is None.

    A choice matches, in this order: the whole UID, a SeriesNumber, a UID prefix; it must match
    exactly one series.

    Raises:
        ImageHeaderError: several series and no choice, or a choice matching none or several;
            the message lists every series (UID, number, description, slices) and the syntax.
    """
    listing = "; ".join(s.describe() for s in series)
    if choice is None:
        if len(series) == 1:
            return series[0]
        raise ImageHeaderError(folder, f"the folder holds {len(series)} DICOM series: {listing}",
                               _choice_fix(folder, series))
    for matches in ([s for s in series if s.uid == choice], [s for s in series if s.number == choice],
                    [s for s in series if s.uid.startswith(choice)]):
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ImageHeaderError(folder, f"'{choice}' matches {len(matches)} of its DICOM series: {listing}",
                                   _choice_fix(folder, series))
    raise ImageHeaderError(folder, f"no DICOM series matches '{choice}'; the folder holds: {listing}",
                           _choice_fix(folder, series))


def folder_slices(folder: Path, files: Sequence[Path] | None = None) -> list[tuple[Path, Dataset]]:
    """``(file, header)`` of every single-frame image slice directly in ``folder`` (no voxels read).

    Raises:
        ImageHeaderError: no DICOM image files, unreadable files, multi-frame files among the slices.
    """
    if files is None:
        files = sorted(p for p in folder.iterdir() if p.is_file() and is_dicom_candidate(p))
    if not files:
        raise ImageHeaderError(folder, "folder holds no DICOM files (.dcm or files with the DICM preamble)")
    readable, errors = read_dicom_slice_headers(files)
    if errors:
        names = ", ".join(e.path.name for e in errors[:5])
        raise ImageHeaderError(folder, f"{len(errors)} DICOM file(s) unreadable ({names}): {errors[0].reason}")
    slices = [(p, ds) for p, ds in readable if is_image_dataset(ds)]
    if not slices:
        raise ImageHeaderError(folder, "folder holds DICOM files but no image (reports, a DICOMDIR)")
    if any(is_multiframe(ds) for _, ds in slices):
        raise ImageHeaderError(folder, "folder mixes multi-frame DICOM files with other files",
                               "list each multi-frame file as its own volume")
    return slices


def chosen_slices(path: str | os.PathLike) -> list[tuple[Path, Dataset]]:
    """The slices of the series ``path`` names (a folder, or ``FOLDER::SERIES``), unsorted."""
    folder, choice = split_series_choice(path)
    if not folder.is_dir():
        raise ImageHeaderError(path, "no such DICOM series folder")
    return list(choose_series(folder, group_series(folder_slices(folder)), choice).slices)


def _check_stack(path: Path, slices: Slices) -> tuple[int, int]:
    """``(rows, columns)`` shared by every slice; raises when the slices are not one grey-level stack."""
    if len(slices) < 2:
        raise ImageHeaderError(path, f"{len(slices)} DICOM image slice(s): a 3D series needs at least 2")
    sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in slices}
    if len(sizes) > 1:
        raise ImageHeaderError(path, f"slices differ in size (rows, columns): {sorted(sizes)}")
    if any(int(ds.get("SamplesPerPixel", 1) or 1) != 1 for _, ds in slices):
        raise ImageHeaderError(path, "colour DICOM (SamplesPerPixel > 1) is not a grey-level volume")
    orientations = [_float_list(ds.get("ImageOrientationPatient"), 6) for _, ds in slices]
    known = [o for o in orientations if o is not None]
    if known and np.ptp(np.asarray(known), axis=0).max() > _ORIENTATION_TOLERANCE:
        raise ImageHeaderError(path, "slices have different orientations (a localizer or multi-plane series), "
                               "not one stack", "choose another series, or remove it from the input")
    return sizes.pop()


def series_grid(path: str | os.PathLike, slices: Slices) -> tuple[list[tuple[Path, Dataset]], VolumeHeader]:
    """Slices of one series in volume order, and the volume's header.

    Args:
        path: the volume path (a folder or ``FOLDER::SERIES``), reported as the header's path.
        slices: ``(file, header)`` of every slice of the series, any order.

    Returns:
        ``(ordered, header)``: slices sorted along the normal (by InstanceNumber when positions
        or orientation are missing: the header's affine is then None) and the
        :class:`~dinov2.data.image_io.VolumeHeader` ``(columns, rows, slices)``.

    Raises:
        ImageHeaderError: not one stack, duplicate positions, missing slices.
    """
    path = Path(path)
    rows, columns = _check_stack(path, slices)
    first = slices[0][1]
    dx, dy = _in_plane_spacing(path, first, None)
    orientation = _float_list(first.get("ImageOrientationPatient"), 6)
    positions = [_float_list(ds.get("ImagePositionPatient"), 3) for _, ds in slices]
    if orientation is None or any(p is None for p in positions):
        ordered = sorted(slices, key=lambda s: int(s[1].get("InstanceNumber", 0) or 0))
        dz, affine = _fallback_slice_spacing(path, first), None
    else:
        normal = np.cross(orientation[:3], orientation[3:])
        order = np.argsort([float(np.dot(p, normal)) for p in positions], kind="stable")
        ordered = [slices[i] for i in order]
        sorted_positions = np.asarray([positions[i] for i in order])
        dz, step = slice_step_from_positions(path, sorted_positions, normal)
        affine = _affine_ras(orientation, list(sorted_positions[0]), dx, dy, step)
    header = VolumeHeader(path=path, shape=(columns, rows, len(ordered)), spacing=(dx, dy, dz), affine=affine,
                          format="dicom-series")
    return ordered, header


def read_series_header(path: str | os.PathLike) -> VolumeHeader:
    """Header of the DICOM series at ``path`` (a folder, or ``FOLDER::SERIES``); no voxels read.

    Raises:
        ImageHeaderError: see :func:`folder_slices`, :func:`choose_series`, :func:`series_grid`.
    """
    return series_grid(path, chosen_slices(path))[1]


def folder_series_headers(folder: Path, slices: Slices) -> list[VolumeHeader | ImageHeaderError]:
    """One header (or the reason there is none) per series in ``folder``, for datalist building.

    A folder of one series is the volume ``folder``; each of several is ``FOLDER::UID``.
    """
    series = group_series(slices)
    results: list[VolumeHeader | ImageHeaderError] = []
    for one in series:
        path = folder if len(series) == 1 else Path(f"{folder}{SERIES_SEPARATOR}{one.uid}")
        try:
            results.append(series_grid(path, one.slices)[1])
        except ImageHeaderError as exc:
            results.append(exc)
    return results


def _slice_voxels(file: Path) -> np.ndarray:
    """``(columns, rows)`` float32 modality values (rescale slope/intercept or modality LUT) of one slice."""
    try:
        dataset = pydicom.dcmread(file)
        values = apply_modality_lut(dataset.pixel_array, dataset)
    except Exception as exc:  # decoder missing, truncated pixel data: name the slice
        raise ImageHeaderError(file, f"pixel data unreadable ({type(exc).__name__}: {exc})") from exc
    return np.asarray(values, dtype=np.float32).T


def load_series(path: str | os.PathLike) -> tuple[np.ndarray, VolumeHeader]:
    """Voxels of the DICOM series at ``path`` (a folder, or ``FOLDER::SERIES``).

    Returns:
        ``(array, header)``: float32 ``(X, Y, Z)`` = ``(columns, rows, slices)`` with the modality
        rescale applied (per slice: slopes may differ between slices), slices in the header's
        order; the header of :func:`read_series_header` (its affine is the voxels' affine).

    Raises:
        ImageHeaderError: as :func:`read_series_header`, or a slice whose pixels do not decode.
    """
    ordered, header = series_grid(path, chosen_slices(path))
    return np.stack([_slice_voxels(file) for file, _ in ordered], axis=2), header
