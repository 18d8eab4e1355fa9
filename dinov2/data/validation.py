"""One validated way in for volumes and label maps.

Every entry point that reads a user's volume goes through this module, so a bad file is reported
the same way everywhere: one :class:`InputVolumeError` (a ``UserError`` and a ``ValueError``) whose message names the
file, says in words what is wrong with it, and what to do. Reader internals (``EOFError``,
``BadGzipFile``, nibabel's ``ImageFileError``, pydicom's ``InvalidDicomError``, MONAI's
"applying transform LoadImaged" wrapper) are translated by :func:`explain_read_error`, which looks
for the root cause along the ``__cause__`` / ``__context__`` chain.

Rejected (``InputVolumeError``):

* a missing or empty (0 bytes) file;
* a file that no reader can open: random bytes, another format renamed, a truncated or corrupted
  ``.gz`` (the voxels are read, not only the header, so a copy cut short is found here);
* wrong dimensionality: 2D images, 5D (and more) arrays, and 4D series unless one frame is chosen
  (``frame``) or the task takes the frames as its channels (``channels`` = number of frames), or the
  caller accepts any number of frames (``any_frames``, pretraining);
* a channel count that the model does not take (``channels``);
* a volume (or the chosen frame) without a single finite voxel;
* a label map with values that are not classes of the task (:func:`read_label_map`);
* an image and a label map (or a mask) on different grids: the message names both files
  (:func:`check_same_grid`).

Tolerated, with one warning per file naming the file and the count: some NaN or +-Inf voxels.
Every pipeline that reads the voxels replaces them by the smallest finite value of the volume
(pretraining ``preprocessing.nonfinite_fill: min``, its default; ``zero`` writes 0 instead;
segmentation finetuning and prediction use the smallest finite value of each channel), see
:class:`dinov2.data.transforms.ReplaceNonFinited`.
"""

from __future__ import annotations

import gzip
import logging
import os
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from monai.transforms import LoadImage, LoadImaged

from dinov2.utils.entry_point import user_error_behind
from dinov2.utils.errors import UserError, exception_chain

from .dicom_series import volume_source
from .image_io import ImageHeaderError, VolumeHeader, read_header, same_grid
from .readers import image_readers

logger = logging.getLogger("dinov2.data.validation")

_REMOVE = "remove it from the input"
_RECOPY = "copy or export it again, or " + _REMOVE


class InputVolumeError(UserError, ValueError):
    """A volume or label map that cannot be used; the message names the file and the fix.

    A :class:`~dinov2.utils.errors.UserError` (entry points print it as one line, no traceback)
    and a ``ValueError`` (code that catches those keeps working).

    Attributes:
        path: the file (or DICOM folder) at fault.
        problem: what is wrong, in words, without the path.
        fix: what to do about it.
        others: other files the problem involves (the image a label map does not fit).
    """

    def __init__(self, path: str | os.PathLike, problem: str, fix: str = "", others: Sequence[str | os.PathLike] = ()):
        self.path = Path(path)
        self.problem = problem.rstrip(". ")
        self.fix = fix.rstrip(". ")
        self.others = tuple(Path(p) for p in others)
        super().__init__(f"{self.path}: {self.reason}")

    @property
    def reason(self) -> str:
        """``problem. fix.`` without the path (for tables that print the path themselves)."""
        text = self.problem + "."
        if self.fix:
            text += " " + self.fix[0].upper() + self.fix[1:] + "."
        return text

    def __reduce__(self):  # keep the fields when sent between processes (DataLoader workers)
        return self.__class__, (self.path, self.problem, self.fix, self.others)


def find_input_error(exc: BaseException | None) -> InputVolumeError | None:
    """The :class:`InputVolumeError` behind ``exc`` (MONAI's ``Compose`` wraps transform errors in a
    ``RuntimeError("applying transform ...")``), or None."""
    return None if exc is None else user_error_behind(exc, (InputVolumeError,))


def explain_read_error(exc: BaseException) -> str | None:
    """What a reader exception means, in words, or None when it is not a known read failure.

    The causes are searched along the ``__cause__`` / ``__context__`` chain, outermost first, so
    MONAI's and this package's wrappers (``RuntimeError("applying transform LoadImaged")``,
    :class:`~dinov2.data.image_io.ImageHeaderError`) are seen through.
    """
    for cause in exception_chain(exc):
        words = _explain_one(cause)
        if words is not None:
            return words
    return None


def _explain_one(cause: BaseException) -> str | None:
    try:
        from nibabel.filebasedimages import ImageFileError
    except ImportError:  # pragma: no cover - nibabel is a dependency
        ImageFileError = ()  # type: ignore[assignment]
    try:
        from pydicom.errors import InvalidDicomError
    except ImportError:  # pragma: no cover - pydicom is a dependency
        InvalidDicomError = ()  # type: ignore[assignment]
    text = str(cause)
    if isinstance(cause, EOFError) or "ended before the end-of-stream" in text:
        return "its compressed data ends early: the file is truncated (an interrupted copy or download)"
    if isinstance(cause, zlib.error) or "CRC check failed" in text or "invalid stored block" in text:
        return "its compressed data is corrupted (the file was damaged in a copy or on disk)"
    if isinstance(cause, gzip.BadGzipFile) or "Not a gzipped file" in text:
        return "it is named .gz but is not gzip-compressed data (a damaged file or another format renamed)"
    if "file shorter than a NIfTI header" in text:
        return "it is too short to hold a NIfTI header (the file is truncated)"
    if "not a NIfTI header size" in text or "is not a single-file NIfTI" in text:
        return "it does not start with a NIfTI header (not a NIfTI file, or a damaged one)"
    if "mmap length is greater than file size" in text or "is too short" in text:
        return "it holds fewer bytes than its header announces (the file is truncated)"
    if "cannot find a suitable reader" in text:
        return "no image reader can open it (not a NIfTI or DICOM volume, or a damaged file)"
    if InvalidDicomError and isinstance(cause, InvalidDicomError):
        return "it is not a DICOM file (no DICOM header)"
    if ImageFileError and isinstance(cause, ImageFileError):
        return "no image reader recognises its content (not a NIfTI or DICOM file, or a damaged one)"
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def read_error(path: str | os.PathLike, exc: BaseException, role: str = "image") -> InputVolumeError:
    """The :class:`InputVolumeError` for a reader failure on ``path`` (checked for the simple causes first)."""
    found = find_input_error(exc)
    if found is not None:
        return found
    path = Path(path)
    simple = _file_problem(path, role)
    if simple is not None:
        return simple
    words = _gzip_problem(path) or explain_read_error(exc)
    if words is None:
        header = _header_or_error(path, role)
        if isinstance(header, InputVolumeError):
            return header
        words = f"it cannot be read as a volume (the reader failed with {type(exc).__name__}: {_first_line(exc)})"
    return InputVolumeError(path, f"the {role} cannot be read: {words}", _RECOPY)


def _gzip_problem(path: Path) -> str | None:
    """Why a ``.gz`` file does not decompress (read to its end, so only on the failure path), or None."""
    if not path.is_file() or not path.name.lower().endswith(".gz"):
        return None
    try:
        with gzip.open(path, "rb") as handle:
            while handle.read(1 << 22):
                pass
    except Exception as exc:  # noqa: BLE001 - any failure here is the diagnosis
        return _explain_one(exc) or "its compressed data cannot be decompressed (a damaged file)"
    return None


def _file_problem(path: Path, role: str) -> InputVolumeError | None:
    """Missing or empty file (or empty DICOM folder) without opening it."""
    if not volume_source(path).exists():  # FOLDER::SERIES names a series of an existing folder
        return InputVolumeError(path, f"the {role} file does not exist", "check the path")
    if path.is_file() and path.stat().st_size == 0:
        return InputVolumeError(path, f"the {role} file is empty (0 bytes)", _RECOPY)
    return None


def _header_or_error(path: Path, role: str) -> VolumeHeader | InputVolumeError:
    try:
        return read_header(path)
    except ImageHeaderError as exc:
        words = explain_read_error(exc)
        if words is not None:
            return InputVolumeError(path, f"the {role} cannot be read: {words}", _RECOPY)
        # image_io's problems are already words ("file is truncated: ...", "folder holds 2 DICOM series"),
        # some with their own fix (choose a series), which beats the generic one.
        return InputVolumeError(path, f"the {role} cannot be read: {exc.problem}", exc.fix or _RECOPY)


def _effective_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Shape without trailing length-1 axes beyond the third: ``(X, Y, Z, 1)`` is a 3D volume."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


@dataclass
class CheckedVolume:
    """A volume that passed :func:`read_volume`.

    Attributes:
        path: the file or DICOM folder.
        header: its :class:`~dinov2.data.image_io.VolumeHeader`.
        shape: array shape without trailing length-1 axes beyond the third.
        frames: frames of a 4D series (1 for a 3D volume).
        frame: the frame chosen from a 4D series, None when the whole file is used.
        channels: channels the file gives the model (1, or the frames of a 4D series used as channels).
        nonfinite: NaN / +-Inf voxels in the part used (0 when the voxels were not read).
        fill_value: the smallest finite value of the part used (what the non-finite voxels become).
    """

    path: Path
    header: VolumeHeader
    shape: tuple[int, ...]
    frames: int
    frame: int | None
    channels: int
    nonfinite: int = 0
    fill_value: float | None = None

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.shape[:3]

    @property
    def affine(self) -> np.ndarray | None:
        return self.header.affine


_warned_lock = threading.Lock()
_warned: set[str] = set()


def warn_nonfinite(path: str | os.PathLike, count: int, total: int, fill: str) -> None:
    """Log once per file and process that ``count`` of ``total`` voxels are NaN/Inf and what they become."""
    key = os.fspath(path)
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    logger.warning("%s: %d of %d voxels are NaN or +-Inf; they are replaced by %s.", key, count, total, fill)


def _frame_flag_text(frame_flag: str | None, frames: int) -> str:
    if frame_flag:
        return f"choose one with {frame_flag} N (0..{frames - 1})"
    return "split the series into 3D volumes (one file per frame)"


def read_volume(
    path: str | os.PathLike,
    *,
    frame: int | None = None,
    channels: int = 1,
    any_frames: bool = False,
    frame_flag: str | None = "--frame",
    role: str = "image",
    read_voxels: bool = True,
) -> CheckedVolume:
    """Read and check one volume (NIfTI file, DICOM series folder or multi-frame DICOM).

    The header is read first (cheap, and it names most damage: empty, not NIfTI, not gzip), then
    the voxels with the readers the pipelines use (MONAI ``LoadImage`` with
    :func:`~dinov2.data.readers.image_readers`), which finds truncated or corrupted compressed
    data and counts non-finite voxels.

    Args:
        path: the file or DICOM folder.
        frame: frame to use from a 4D series (ignored for a 3D volume).
        channels: channels the model takes from this file: 1 = a 3D volume or one frame of a 4D
            series; C > 1 = a 4D series of exactly C frames (frames as channels).
        any_frames: accept a 4D series of any length as it is (pretraining picks frames itself).
        frame_flag: the option that chooses a frame, named in the message for a 4D input without
            one (None: there is none, so the message asks for 3D files).
        role: what the file is, for messages (``"image"``, ``"mask"``, ``"label map"``).
        read_voxels: also read the voxels (truncated data, non-finite voxels); False checks the header only.

    Returns:
        A :class:`CheckedVolume`. Partial NaN/Inf: one warning (see :func:`warn_nonfinite`).

    Raises:
        InputVolumeError: see the module docstring.
    """
    path = Path(path)
    simple = _file_problem(path, role)
    if simple is not None:
        raise simple
    header = _header_or_error(path, role)
    if isinstance(header, InputVolumeError):
        raise header
    shape = _effective_shape(header.shape)
    if len(shape) < 3:
        raise InputVolumeError(path, f"the {role} is {len(shape)}D (shape {list(header.shape)}), not a 3D volume",
                               "give the 3D volume (a 2D slice cannot be used), or " + _REMOVE)
    if len(shape) > 4:
        raise InputVolumeError(path, f"the {role} is {len(shape)}D (shape {list(header.shape)}); only 3D volumes "
                               "and 4D series (X, Y, Z, frames) can be read", "save it as 3D volumes, or " + _REMOVE)
    frames = shape[3] if len(shape) == 4 else 1
    used_frame, used_channels = None, 1
    if frames > 1 and not any_frames:
        if frame is not None:
            if channels != 1:
                raise InputVolumeError(path, f"one frame gives 1 channel but the model takes {channels}",
                                       f"give a 4D series of {channels} frames without a frame choice, or "
                                       f"{channels} 3D files")
            if not 0 <= int(frame) < frames:
                raise InputVolumeError(path, f"the {role} has {frames} frames (0..{frames - 1}); frame {frame} is out "
                                       "of range", f"choose a frame between 0 and {frames - 1}")
            used_frame = int(frame)
        elif channels == frames:
            used_channels = frames
        elif channels == 1:
            raise InputVolumeError(path, f"the {role} is a 4D series of {frames} frames (shape {list(shape)}) but the "
                                   "model takes one 3D volume", _frame_flag_text(frame_flag, frames))
        else:
            raise InputVolumeError(path, f"the {role} has {frames} frames but the model takes {channels} channels",
                                   f"give {channels} 3D files (one per modality) or one 4D file of {channels} frames")
    elif frames > 1:
        used_channels = frames
    elif channels > 1:
        raise InputVolumeError(path, f"the {role} is one 3D volume but the model takes {channels} channels",
                               f"give {channels} files (one per modality, e.g. as 'image' lists in a datalist JSON) or "
                               f"one 4D file of {channels} frames")
    checked = CheckedVolume(path, header, shape, frames, used_frame, used_channels)
    if not read_voxels:
        return checked
    try:
        array = LoadImage(reader=image_readers(), image_only=True, dtype=np.float32)(str(path))
    except Exception as exc:  # noqa: BLE001 - every reader failure becomes one message
        raise read_error(path, exc, role) from exc
    values = np.asarray(array)
    if values.shape != shape and values.size == int(np.prod(shape)):
        values = values.reshape(shape)  # (X, Y, Z, 1) is the 3D volume (X, Y, Z)
    if used_frame is not None and values.ndim == 4:
        values = values[..., used_frame]
    finite = np.isfinite(values)
    count = int(values.size - np.count_nonzero(finite))
    where = f"frame {used_frame} of the {role}" if used_frame is not None else f"the {role}"
    if count == values.size:
        raise InputVolumeError(path, f"{where} has no finite voxel (all {values.size} are NaN or +-Inf)",
                               "export it again or " + _REMOVE)
    if count:
        checked.fill_value = float(values[finite].min())
        warn_nonfinite(path, count, int(values.size), f"the smallest finite value ({checked.fill_value:g})")
    checked.nonfinite = count
    return checked


def check_same_grid(reference: CheckedVolume | VolumeHeader | str | os.PathLike,
                    other: CheckedVolume | VolumeHeader | str | os.PathLike,
                    role: str = "label map", reference_role: str = "image") -> None:
    """Raise unless ``other`` lies on the voxel grid (spatial shape and affine) of ``reference``.

    Raises:
        InputVolumeError: on ``other``, naming both files and the difference.
    """
    def header_of(item) -> VolumeHeader:
        if isinstance(item, CheckedVolume):
            return item.header
        if isinstance(item, VolumeHeader):
            return item
        result = _header_or_error(Path(item), role)
        if isinstance(result, InputVolumeError):
            raise result
        return result

    ref, oth = header_of(reference), header_of(other)
    equal, why = same_grid(ref, oth)
    if equal:
        return
    if ref.spatial_shape != oth.spatial_shape:
        problem = (f"the {role} has shape {list(oth.spatial_shape)} but its {reference_role} {ref.path} has shape "
                   f"{list(ref.spatial_shape)}")
    else:
        problem = f"the {role} is not on the voxel grid of its {reference_role} {ref.path}: {why}"
    fix = f"resample the {role} onto the {reference_role} (nearest neighbour for labels), or pair it with the right file"
    raise InputVolumeError(oth.path, problem, fix, others=[ref.path])


def _label_values(path: Path, values: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a label array (bincount for small non-negative integers)."""
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        if not finite.all():
            raise InputVolumeError(path, "the label map holds NaN or +-Inf values",
                                   "store labels as integers (class indices)")
        if not np.array_equal(values, np.round(values)):
            raise InputVolumeError(path, "the label map holds non-integer values (an interpolated or probability map?)",
                                   "store labels as integers (class indices), resampled with nearest neighbour")
        values = values.astype(np.int64)
    if values.dtype.kind in "iub" and values.size:
        low, high = int(values.min()), int(values.max())
        if low >= 0 and high < 1 << 16:
            counts = np.bincount(values.ravel().astype(np.intp, copy=False), minlength=1)
            return np.flatnonzero(counts)
    return np.unique(values)


def read_label_map(
    path: str | os.PathLike,
    allowed: Iterable[int],
    classes: str,
    *,
    image: CheckedVolume | VolumeHeader | str | os.PathLike | None = None,
    fix: str = "correct the label map, or map its values onto the classes (dataset.remap)",
) -> np.ndarray:
    """Read a label map and check that every value is a class of the task (and its grid).

    Args:
        path: the label map (3D, or 4D with one channel).
        allowed: label values the task accepts (as stored in the file, i.e. before any remap).
        classes: the classes in words, for the message (e.g. ``"0 background, 1 grey matter"``).
        image: the image the label map belongs to: the grids must match (names both files).
        fix: what to do when values are outside the classes.

    Returns:
        The distinct values found, sorted.

    Raises:
        InputVolumeError: unreadable file, not one 3D map, off the image grid, values outside ``allowed``.
    """
    path = Path(path)
    simple = _file_problem(path, "label map")
    if simple is not None:
        raise simple
    header = _header_or_error(path, "label map")
    if isinstance(header, InputVolumeError):
        raise header
    shape = _effective_shape(header.shape)
    if len(shape) != 3:
        raise InputVolumeError(path, f"the label map has shape {list(header.shape)}, not one 3D map",
                               "store labels as one 3D map of class indices")
    if image is not None:
        check_same_grid(image, header)
    try:
        import nibabel as nib

        if header.format == "nifti":
            values = np.asanyarray(nib.load(str(path)).dataobj)
        else:
            values = np.asarray(LoadImage(reader=image_readers(), image_only=True)(str(path)))
    except Exception as exc:  # noqa: BLE001 - every reader failure becomes one message
        raise read_error(path, exc, "label map") from exc
    found = _label_values(path, values)
    allowed_set = {int(v) for v in allowed}
    bad = [int(v) for v in found if int(v) not in allowed_set]
    if bad:
        shown = ", ".join(str(v) for v in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise InputVolumeError(path, f"the label map holds value(s) {shown} that are not classes of this task "
                               f"(classes: {classes})", fix)
    return found


def input_paths(value: Any) -> list[str]:
    """The file paths of a datalist value: one path or a list of them (anything else: none)."""
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in value):
        return [os.fspath(v) for v in value]
    return []


class LoadVolumed(LoadImaged):
    """MONAI ``LoadImaged`` whose failures are :class:`InputVolumeError` s in words, naming the file.

    Also rejects arrays that are neither a 3D volume nor a 4D series (2D images, 5D arrays) right
    after reading, instead of a shape error several transforms later. Takes ``LoadImaged``'s
    arguments; ``role`` names what the keys hold (default ``"image"``; ``"label map"`` for a key
    called ``label``).
    """

    def __call__(self, data, reader=None):
        try:
            out = super().__call__(data, reader)
        except Exception as exc:  # noqa: BLE001 - reader failures become one message
            found = find_input_error(exc)
            if found is not None:
                raise found from exc
            for key in self.key_iterator(dict(data)):
                files = input_paths(data[key])
                role = "label map" if key == "label" else "image"
                for file in files:  # which of several modality files is at fault
                    problem = _file_problem(Path(file), role)
                    header = _header_or_error(Path(file), role) if problem is None else problem
                    if isinstance(header, InputVolumeError):
                        raise header from exc
                if files:
                    raise read_error(files[0], exc, role) from exc
            raise
        for key in self.key_iterator(out):
            files = input_paths(data[key])
            if len(files) != 1:
                continue  # several modality files are stacked into channels; each was read as one volume
            shape = _effective_shape(getattr(out[key], "shape", ()))
            if len(shape) in (3, 4):
                continue
            role = "label map" if key == "label" else "image"
            what = f"{len(shape)}D (shape {list(getattr(out[key], 'shape', ()))})"
            raise InputVolumeError(files[0], f"the {role} is {what}; only 3D volumes and 4D series can be read",
                                   "give 3D volumes, or " + _REMOVE)
        return out
