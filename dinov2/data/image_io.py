"""Header-only reading of medical volumes: NIfTI files, DICOM series folders, multi-frame DICOM.

Datalists are built and validated from headers alone, so checking 10,000 volumes costs seconds
rather than the hours it would take to decompress every voxel. Everything here returns a
:class:`VolumeHeader` in one convention, the one MONAI's readers load the voxels in:

* axis order: NIfTI keeps its own array order; DICOM is ``(columns, rows, slices)`` (MONAI's
  ``PydicomReader`` with ``swap_ij=True``);
* ``spacing`` holds the three spatial voxel sizes in mm (a 4th NIfTI "zoom" is time, not space);
* ``affine`` maps voxel indices to RAS+ world millimetres (DICOM's LPS is flipped to RAS, as
  MONAI does with ``affine_lps_to_ras=True``); ``None`` when a DICOM lacks orientation tags.

DICOM series folders (which files, in which order, ``FOLDER::SERIES`` choices) are read by
:mod:`dinov2.data.dicom_series`; the slice-spacing rules shared with multi-frame files are here
(:func:`slice_step_from_positions`).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import nibabel as nib
import numpy as np
import pydicom
from nibabel.openers import ImageOpener
from pydicom.dataset import Dataset

from dinov2.utils.errors import UserError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# Files with these suffixes are never images; skipping them avoids opening every sidecar file.
NON_IMAGE_SUFFIXES = frozenset(
    {".json", ".txt", ".csv", ".tsv", ".md", ".yaml", ".yml", ".xml", ".py", ".png", ".jpg", ".jpeg",
     ".pdf", ".zip", ".gz", ".tar", ".bval", ".bvec", ".log", ".html", ".pth", ".pt", ".npy", ".npz"}
)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# DICOMDIR (Media Storage Directory) files carry the DICM magic but hold no pixels.
_MEDIA_STORAGE_DIRECTORY_UID = "1.2.840.10008.1.3.10"
# A step between slices may differ from the median by this fraction before it is reported: scanners
# round positions to a few decimals, so exact equality would warn on nearly every series.
UNEVEN_SPACING_TOLERANCE = 0.01
# A gap this many times the median step means slices are missing (one missing slice doubles it).
MISSING_SLICE_FACTOR = 1.5

logger = logging.getLogger("dinov2.data.image_io")


class ImageHeaderError(UserError, ValueError):
    """A file or folder whose header cannot give a volume grid.

    Attributes:
        path: the file or folder.
        problem: what is wrong, without the path.
        fix: what to do about it ("" when the generic advice, export the file again, applies).
        reason: ``problem`` and ``fix`` in one line, without the path (datalist reports print
            the path themselves).
    """

    def __init__(self, path: str | os.PathLike, problem: str, fix: str = ""):
        self.path = Path(path)
        self.problem = problem
        self.fix = fix
        self.reason = f"{problem}; {fix}" if fix else problem
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # keep the fields when sent between processes (datalist workers)
        return self.__class__, (self.path, self.problem, self.fix)


@dataclass(frozen=True)
class VolumeHeader:
    """Grid of one volume, read from its header.

    Attributes:
        path: the NIfTI file, DICOM series folder or multi-frame DICOM file.
        shape: array shape, spatial axes first, e.g. ``(X, Y, Z)`` or ``(X, Y, Z, C)``.
        spacing: spatial voxel size in mm, one value per spatial axis (at most 3).
        affine: ``(4, 4)`` voxel-to-RAS-mm matrix, or ``None`` if the header has no orientation.
        format: ``"nifti"``, ``"dicom-series"`` or ``"dicom-multiframe"``.
    """

    path: Path
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray | None
    format: str

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.shape[:3]


def is_nifti_path(path: str | os.PathLike) -> bool:
    """True if the name ends in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def strip_image_suffix(name: str) -> str:
    """File name without its image extension: ``case1_t1.nii.gz`` -> ``case1_t1``.

    Only known image suffixes are removed, because DICOM-style names such as
    ``1.2.840.113619.2.55`` contain dots that are part of the name.
    """
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES + DICOM_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_dicom_candidate(path: str | os.PathLike) -> bool:
    """Whether a file should be read as DICOM.

    Named ``.dcm``/``.dicom``/``.ima`` files are; so are files without a known non-image suffix
    that start with the DICOM preamble magic (scanners often write extensionless or UID-named
    files). Old ACR-NEMA files without the preamble are not detected unless named ``.dcm``.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(DICOM_SUFFIXES):
        return True
    if name == "dicomdir" or is_nifti_path(name) or path.suffix.lower() in NON_IMAGE_SUFFIXES:
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def read_header(path: str | os.PathLike) -> VolumeHeader:
    """Read the grid of a NIfTI file, a DICOM series folder or a multi-frame DICOM file.

    Args:
        path: a ``.nii``/``.nii.gz`` file, a folder holding the slices of a DICOM series (one
            series of several chosen as ``FOLDER::SERIES``, see :mod:`dinov2.data.dicom_series`),
            or a DICOM file with ``NumberOfFrames > 1``.

    Returns:
        The :class:`VolumeHeader`; no voxel data is read.

    Raises:
        ImageHeaderError: missing file, unreadable or inconsistent header, unsupported format.
    """
    # Imported here because dicom_series builds on this module's header helpers.
    from .dicom_series import read_series_header, split_series_choice  # noqa: PLC0415

    path = Path(path)
    if split_series_choice(path)[0].is_dir():
        return read_series_header(path)
    if not path.exists():
        raise ImageHeaderError(path, "file not found")
    if is_nifti_path(path):
        return read_nifti_header(path)
    if is_dicom_candidate(path):
        dataset = _dcmread_header(path)
        if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
            return dicom_multiframe_header(path, dataset)
        raise ImageHeaderError(
            path, "a single-frame DICOM file is one 2D slice; give the folder that holds the whole series"
        )
    raise ImageHeaderError(path, "not a NIfTI (.nii, .nii.gz) file, DICOM file or DICOM series folder")


def read_nifti_header(path: str | os.PathLike) -> VolumeHeader:
    """Grid of a NIfTI-1/NIfTI-2 file from its first few hundred bytes.

    The header is parsed directly (about 5x faster than ``nibabel.load``, which first sniffs the
    file type and validates twice). For an uncompressed ``.nii`` the file size is also checked
    against the header, which catches truncated copies for free; a truncated ``.nii.gz`` is only
    noticed when its voxels are read.
    """
    path = Path(path)
    try:
        with ImageOpener(path) as handle:
            head = handle.read(4)
            if len(head) < 4:
                raise ValueError("file shorter than a NIfTI header")
            sizes = {int.from_bytes(head, "little"), int.from_bytes(head, "big")}
            header_class = nib.Nifti1Header if 348 in sizes else nib.Nifti2Header if 540 in sizes else None
            if header_class is None:
                raise ValueError("first 4 bytes are not a NIfTI header size (348 or 540)")
            handle.seek(0)
            header = header_class.from_fileobj(handle, check=False)
        magic = bytes(header["magic"]).rstrip(b"\x00")
        if magic not in (b"n+1", b"n+2"):
            raise ValueError(f"magic {magic!r} is not a single-file NIfTI ('n+1'/'n+2')")
        shape = tuple(int(s) for s in header.get_data_shape())
        zooms = header.get_zooms()
        affine = np.asarray(header.get_best_affine(), dtype=np.float64)
        dtype = header.get_data_dtype()
    except Exception as exc:  # gzip, struct and nibabel errors on damaged or foreign files
        raise ImageHeaderError(path, f"NIfTI header unreadable ({type(exc).__name__}: {exc})") from exc
    if not shape or min(shape) < 1:
        raise ImageHeaderError(path, f"NIfTI header gives an empty shape {list(shape)}")
    if str(path).lower().endswith(".nii"):
        expected = int(header.get_data_offset()) + int(np.prod(shape)) * dtype.itemsize
        actual = path.stat().st_size
        if actual < expected:
            raise ImageHeaderError(path, f"file is truncated: {actual} bytes, header needs {expected}")
    spacing = tuple(float(z) for z in zooms[: min(3, len(shape))])
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise ImageHeaderError(path, f"voxel sizes {spacing} are not positive numbers")
    return VolumeHeader(path=path, shape=shape, spacing=spacing, affine=affine, format="nifti")


def _dcmread_header(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # InvalidDicomError, EOFError, OSError, struct errors on damaged files
        raise ImageHeaderError(path, f"DICOM header unreadable ({type(exc).__name__}: {exc})") from exc


def read_dicom_slice_headers(
    files: Iterable[str | os.PathLike],
) -> tuple[list[tuple[Path, Dataset]], list[ImageHeaderError]]:
    """Parse the few tags needed from each DICOM file.

    Returns:
        ``(readable, errors)``: ``(path, dataset)`` pairs for files whose header parsed, and one
        :class:`ImageHeaderError` per file that did not.
    """
    readable, errors = [], []
    for file in files:
        file = Path(file)
        try:
            readable.append((file, _dcmread_header(file)))
        except ImageHeaderError as exc:
            errors.append(exc)
    return readable, errors


def is_multiframe(dataset: Dataset) -> bool:
    """True for a DICOM object holding a whole volume (``NumberOfFrames > 1``)."""
    return int(dataset.get("NumberOfFrames", 1) or 1) > 1


def is_image_dataset(dataset: Dataset) -> bool:
    """True if the DICOM object has pixel rows/columns (not a DICOMDIR, report or presentation state)."""
    if str(dataset.get("SOPClassUID", "")) == _MEDIA_STORAGE_DIRECTORY_UID:
        return False
    return "Rows" in dataset and "Columns" in dataset


def _float_list(value, count: int) -> list[float] | None:
    if value is None:
        return None
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return values if len(values) == count else None


def _in_plane_spacing(path: Path, dataset: Dataset, shared: Dataset | None) -> tuple[float, float]:
    """``(spacing along columns index, spacing along rows index)`` in mm, i.e. x then y."""
    pixel_spacing = _float_list(dataset.get("PixelSpacing"), 2)
    if pixel_spacing is None and shared is not None:
        pixel_spacing = _float_list(shared.get("PixelSpacing"), 2)
    if pixel_spacing is None or min(pixel_spacing) <= 0:
        raise ImageHeaderError(path, "no valid PixelSpacing; in-plane voxel size unknown")
    # PixelSpacing is (between rows, between columns): the column index (x) moves along a row.
    return pixel_spacing[1], pixel_spacing[0]


def _affine_ras(
    orientation: list[float] | None,
    first_position: list[float] | None,
    dx: float,
    dy: float,
    slice_step: np.ndarray | None,
) -> np.ndarray | None:
    if orientation is None or first_position is None or slice_step is None:
        return None
    row_cosine, col_cosine = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    lps = np.eye(4)
    lps[:3, 0] = row_cosine * dx
    lps[:3, 1] = col_cosine * dy
    lps[:3, 2] = slice_step
    lps[:3, 3] = first_position
    return _LPS_TO_RAS @ lps


def slice_step_from_positions(path: Path, positions: np.ndarray, normal: np.ndarray) -> tuple[float, np.ndarray]:
    """Slice spacing and the world step between slices, from their positions.

    Args:
        path: the series (for messages).
        positions: ``(N, 3)`` ImagePositionPatient of the slices (LPS mm), sorted along ``normal``.
        normal: ``(3,)`` unit slice normal (row cosine x column cosine).

    Returns:
        ``(spacing, step)``: spacing in mm and the ``(3,)`` LPS step from one slice to the next.
        Even spacing gives the mean step; uneven spacing without a gap gives the median step and
        one warning (the voxels then lie on a grid of median steps).

    Raises:
        ImageHeaderError: two slices at one position, or a gap of missing slices.
    """
    distances = positions @ normal
    gaps = np.diff(distances)
    if np.any(gaps < 1e-4):
        raise ImageHeaderError(
            path, f"{len(gaps) + 1 - len(np.unique(np.round(distances, 4)))} slice(s) share a position with another",
            "the series holds several acquisitions (echoes, time points); split them into folders",
        )
    median = float(np.median(gaps))
    missing = np.flatnonzero(gaps > MISSING_SLICE_FACTOR * median)
    if missing.size:
        raise ImageHeaderError(path, _missing_slices_problem(positions, gaps, missing, median),
                               "copy the complete series again, or remove it from the input")
    span = positions[-1] - positions[0]
    deviation = float(np.max(np.abs(gaps - median)))
    if deviation <= UNEVEN_SPACING_TOLERANCE * median:
        step = span / (len(positions) - 1)
    else:
        _warn_uneven(path, gaps, median)
        # Along the same direction (a gantry tilt's shear included), one median step long.
        step = span / (distances[-1] - distances[0]) * median
    return float(np.linalg.norm(step)), step


def _missing_slices_problem(positions: np.ndarray, gaps: np.ndarray, missing: np.ndarray, median: float) -> str:
    """Where slices are missing, as the positions either side of each gap (LPS mm, as in the tags)."""
    def where(i: int) -> str:
        before, after = (", ".join(f"{v:.4g}" for v in positions[j]) for j in (i, i + 1))
        return f"({before}) to ({after}), a {gaps[i]:.4g} mm gap"

    shown = "; ".join(where(int(i)) for i in missing[:3])
    if missing.size > 3:
        shown += f"; and {missing.size - 3} more"
    count = int(sum(round(gaps[i] / median) - 1 for i in missing))
    return (f"about {count} slice(s) missing (the slices are {median:.4g} mm apart but jump from ImagePositionPatient "
            f"{shown})")


_warned_lock = threading.Lock()
_warned: set[str] = set()


def _warn_uneven(path: Path, gaps: np.ndarray, median: float) -> None:
    """Log once per series and process: the header and the voxel reader both meet the same series."""
    key = os.fspath(path)
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    logger.warning("%s: uneven slice spacing (%.4g to %.4g mm between neighbouring slices); the volume is read on a "
                   "uniform grid of the median step, %.4g mm, so slices may lie up to %.3g mm off their position.",
                   key, float(gaps.min()), float(gaps.max()), median, float(np.max(np.abs(np.cumsum(gaps - median)))))


def _fallback_slice_spacing(path: Path, *datasets: Dataset | None) -> float:
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        for dataset in datasets:
            if dataset is not None and dataset.get(key) not in (None, ""):
                value = float(dataset.get(key))
                if value > 0:
                    return value
    raise ImageHeaderError(
        path, "slice spacing unknown: no ImagePositionPatient on the slices and no SpacingBetweenSlices/SliceThickness"
    )


def dicom_multiframe_header(path: str | os.PathLike, dataset: Dataset) -> VolumeHeader:
    """Grid of a multi-frame DICOM file (classic or enhanced functional-group layout).

    Frames are taken as slices; a multi-frame file holding several time points is not told apart.
    """
    path = Path(path)
    if "Rows" not in dataset or "Columns" not in dataset:
        raise ImageHeaderError(path, "multi-frame DICOM without Rows/Columns")
    if int(dataset.get("SamplesPerPixel", 1) or 1) != 1:
        raise ImageHeaderError(path, "colour DICOM (SamplesPerPixel > 1) is not a grey-level volume")
    frames = int(dataset.NumberOfFrames)
    shared = None
    if "SharedFunctionalGroupsSequence" in dataset and len(dataset.SharedFunctionalGroupsSequence):
        groups = dataset.SharedFunctionalGroupsSequence[0]
        if "PixelMeasuresSequence" in groups and len(groups.PixelMeasuresSequence):
            shared = groups.PixelMeasuresSequence[0]
    dx, dy = _in_plane_spacing(path, dataset, shared)
    orientation = _float_list(dataset.get("ImageOrientationPatient"), 6)
    if orientation is None and "SharedFunctionalGroupsSequence" in dataset:
        groups = dataset.SharedFunctionalGroupsSequence[0]
        if "PlaneOrientationSequence" in groups:
            orientation = _float_list(groups.PlaneOrientationSequence[0].get("ImageOrientationPatient"), 6)
    positions = []
    for frame in dataset.get("PerFrameFunctionalGroupsSequence", []):
        plane = frame.get("PlanePositionSequence")
        positions.append(_float_list(plane[0].get("ImagePositionPatient"), 3) if plane else None)
    affine = None
    if orientation is not None and len(positions) == frames and all(p is not None for p in positions):
        normal = np.cross(orientation[:3], orientation[3:])
        ordered = np.asarray(sorted(positions, key=lambda p: float(np.dot(p, normal))))
        dz, step = slice_step_from_positions(path, ordered, normal)
        affine = _affine_ras(orientation, list(ordered[0]), dx, dy, step)
    else:
        dz = _fallback_slice_spacing(path, dataset, shared)
        origin = _float_list(dataset.get("ImagePositionPatient"), 3)
        if orientation is not None and origin is not None:
            normal = np.cross(orientation[:3], orientation[3:])
            affine = _affine_ras(orientation, origin, dx, dy, normal * dz)
    return VolumeHeader(
        path=path,
        shape=(int(dataset.Columns), int(dataset.Rows), frames),
        spacing=(dx, dy, dz),
        affine=affine,
        format="dicom-multiframe",
    )


def load_dicom_multiframe(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Voxels of a multi-frame DICOM file in this module's axis convention.

    MONAI 1.6's ``PydicomReader`` handles multi-frame files only as DICOM SEG: a classic or
    enhanced multi-frame image comes back as ``(rows, frames, columns)`` with a wrong slice
    spacing. This loader returns ``(columns, rows, frames)`` to match :func:`read_header`.

    Returns:
        ``(array, affine)``: ``(X, Y, Z)`` stored pixel values (rescale slope/intercept applied
        when present) and the ``(4, 4)`` RAS affine (or ``None``) of :func:`read_header`.
    """
    path = Path(path)
    header = read_header(path)
    if header.format != "dicom-multiframe":
        raise ImageHeaderError(path, f"not a multi-frame DICOM file ({header.format})")
    dataset = pydicom.dcmread(path)
    pixels = dataset.pixel_array  # (frames, rows, columns)
    array = np.transpose(pixels, (2, 1, 0))
    slope, intercept = float(dataset.get("RescaleSlope", 1) or 1), float(dataset.get("RescaleIntercept", 0) or 0)
    if slope != 1 or intercept != 0:
        array = array.astype(np.float32) * slope + intercept
    return np.ascontiguousarray(array), header.affine


def same_grid(a: VolumeHeader, b: VolumeHeader, atol: float = 1e-3) -> tuple[bool, str]:
    """Whether two volumes share a voxel grid (spatial shape and affine), with the difference.

    Affines are compared to ``atol`` mm (float32 header storage rounds them); when either volume
    has no affine, spacing is compared instead.

    Returns:
        ``(equal, explanation)``; the explanation is empty when equal.
    """
    if a.spatial_shape != b.spatial_shape:
        return False, f"spatial shape {list(b.spatial_shape)} != {list(a.spatial_shape)}"
    if a.affine is not None and b.affine is not None:
        difference = float(np.max(np.abs(a.affine - b.affine)))
        if difference > atol:
            return False, f"affine differs by up to {difference:.4g} mm (voxel-to-world matrices do not match)"
        return True, ""
    if not np.allclose(a.spacing, b.spacing, rtol=1e-4, atol=atol):
        return False, f"spacing {list(b.spacing)} != {list(a.spacing)}"
    return True, ""
