"""The one way in and out for the image and label stacks of instance segmentation: TIFF and NIfTI.

What it holds: the stack API that every command and test uses (:class:`Stack`,
:func:`read_image`, :func:`read_labels`, :func:`write_labels`, :func:`write_stack`,
:func:`new_stack`), the listing and naming of stack files, the resolution of the voxel spacing,
the label checks, the atomic write, and NIfTI (a few lines over nibabel and
:func:`dinov2.data.validation.read_volume`). The TIFF format details (tifffile, ImageJ / OME
metadata, damaged files) are in :mod:`dinov2.eval.instances.tiff_io`, so that this module reads
as the API's rules; nothing else imports that module.

Every array is ``(X, Y, Z)``, as everywhere in this project. A 3D TIFF stores its planes as
``(Z, Y, X)``; it is transposed on reading and back on writing. NIfTI keeps its own array order.

Voxel spacing (:attr:`Stack.spacing`, one value per array axis, in the unit the file states, see
``meta["unit"]``) comes from, first to last:

1. the ``spacing`` argument (the ``--spacing`` flag, or a datalist entry's ``"spacing": [x, y, z]``);
2. the file: the ImageJ, OME-XML or resolution tags of a TIFF (which ones, and in what order:
   :mod:`~dinov2.eval.instances.tiff_io`), or the NIfTI header;
3. for a label stack read with ``like=``, the image's spacing;
4. 1.0, with ONE warning per file naming it and how to give the spacing. A file that has its
   in-plane spacing but no Z step gets the X spacing along Z (isotropic voxels), with the warning.

Bad files raise :class:`~dinov2.data.validation.InputVolumeError` (a ``UserError``): one line that
names the file, what is wrong and what to do. NIfTI files are checked by
:func:`dinov2.data.validation.read_volume` (empty, not NIfTI, truncated, 2D, 4D series, 5D), the
same checks and words as every other command of the package.

TIFF stacks need ``tifffile``, which comes with the optional extra ``instances``; it is imported
only when a TIFF is read or written.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dinov2.data.image_io import is_nifti_path
from dinov2.data.validation import InputVolumeError, read_error, read_volume, warn_nonfinite
from dinov2.utils.errors import UsageError

from .tiff_io import RECOPY_HINT, read_tiff, write_tiff

logger = logging.getLogger("dinov2.eval.instances.io")

TIFF_SUFFIXES = (".tif", ".tiff")
STACK_SUFFIXES = TIFF_SUFFIXES + (".nii.gz", ".nii")
MAX_LABEL = np.iinfo(np.uint16).max
SPACING_HINT = 'give it as "spacing": [x, y, z] in the datalist entry, or --spacing X Y Z on the command line'


@dataclass
class Stack:
    """A 3D image or label stack and what is needed to write a label stack back like it.

    Attributes:
        array: ``(X, Y, Z)`` voxels: float32 for images, integers for labels.
        spacing: voxel size along each array axis ``(x, y, z)``, in ``meta["unit"]``.
        kind: ``"tiff"`` or ``"nifti"``.
        affine: ``(4, 4)`` float64 voxel-to-world matrix; ``diag(spacing, 1)`` for a TIFF.
        path: the file read.
        meta: format details for :func:`write_labels`: ``unit`` (str or None) and
            ``spacing_source`` (``"argument"``, ``"file"``, ``"image"`` or ``"default"``) always;
            ``header`` (the nibabel header) and ``file_affine`` for NIfTI.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    kind: str
    affine: np.ndarray
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The ``(X, Y, Z)`` shape of :attr:`array`."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# names and folders
# --------------------------------------------------------------------------------------------


def stack_suffix(path: str | os.PathLike) -> str | None:
    """The stack extension of ``path`` as written (``.tif``, ``.TIFF``, ``.nii.gz``...), or None."""
    name = Path(path).name
    lower = name.lower()
    for suffix in STACK_SUFFIXES:
        if lower.endswith(suffix):
            return name[-len(suffix):]
    return None


def stack_stem(path: str | os.PathLike) -> str:
    """The file name without its stack extension: ``cells.tif`` -> ``cells``, ``a.nii.gz`` -> ``a``."""
    name = Path(path).name
    suffix = stack_suffix(name)
    return name[: -len(suffix)] if suffix else name


def output_name(path: str | os.PathLike, suffix: str = "_instances") -> str:
    """The output file name of an input stack: ``cells.tif`` -> ``cells_instances.tif``,
    ``a.nii.gz`` -> ``a_instances.nii.gz`` (same extension as the input)."""
    return stack_stem(path) + suffix + (stack_suffix(path) or "")


def list_stacks(path: str | os.PathLike) -> list[Path]:
    """The stacks to process: ``path`` itself if it is a file, else the ``.tif`` / ``.tiff`` /
    ``.nii`` / ``.nii.gz`` files of the folder (not its sub-folders, no hidden files), sorted by name.

    Raises:
        InputVolumeError: ``path`` does not exist, is a file of another format, or is a folder
            without any stack.
    """
    path = Path(path)
    if not path.exists():
        raise InputVolumeError(path, "no such file or folder", "check the path")
    if path.is_file():
        if stack_suffix(path) is None:
            raise InputVolumeError(path, f"not a stack file (expected {', '.join(STACK_SUFFIXES)})",
                                   "give a TIFF or NIfTI stack, or a folder of them")
        return [path]
    found = sorted(p for p in path.iterdir()
                   if p.is_file() and not p.name.startswith(".") and stack_suffix(p) is not None)
    if not found:
        raise InputVolumeError(path, f"the folder holds no stack ({', '.join(STACK_SUFFIXES)} files)",
                               "give a folder of TIFF or NIfTI stacks, or one file")
    return found


def _kind(path: Path, role: str) -> str:
    if is_nifti_path(path):
        return "nifti"
    if path.name.lower().endswith(TIFF_SUFFIXES):
        return "tiff"
    raise InputVolumeError(path, f"the {role} is neither TIFF ({', '.join(TIFF_SUFFIXES)}) nor NIfTI (.nii, .nii.gz)",
                           "convert it to a TIFF stack or a NIfTI volume")


def _file_exists(path: Path, role: str) -> None:
    """Missing and empty files, before any reader sees them."""
    if not path.is_file():
        raise InputVolumeError(path, f"the {role} file does not exist", "check the path")
    if path.stat().st_size == 0:
        raise InputVolumeError(path, f"the {role} file is empty (0 bytes)", RECOPY_HINT)


def check_spacing(spacing: Sequence[float] | None, where: str = "--spacing") -> tuple[float, float, float] | None:
    """``spacing`` as three positive finite floats, None when None.

    Raises:
        UsageError: not three positive numbers (the message names ``where``).
    """
    if spacing is None:
        return None
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise UsageError(f"{where} must be three positive numbers (x y z voxel size), got {spacing!r}")
    return values  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------


def _read_nifti(path: Path, role: str) -> tuple[np.ndarray, list[float | None], dict]:
    """``(array (X, Y, Z) as stored (scaling applied), header spacing, meta)`` of a NIfTI volume."""
    import nibabel as nib

    checked = read_volume(path, role=role, read_voxels=False, frame_flag=None)
    try:
        image = nib.load(str(path))
        array = np.asanyarray(image.dataobj)
    except Exception as exc:  # noqa: BLE001 - every reader failure becomes one message
        raise read_error(path, exc, role) from exc
    array = array.reshape(checked.spatial_shape)  # (X, Y, Z, 1) is the volume (X, Y, Z)
    affine = np.asarray(image.affine, dtype=np.float64)
    meta = {"unit": image.header.get_xyzt_units()[0], "header": image.header.copy(), "file_affine": affine}
    return array, list(checked.header.spacing), meta


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

_warned_lock = threading.Lock()
_warned: set[str] = set()


def _warn_spacing_once(path: Path, stated: Sequence[float | None], used: Sequence[float]) -> None:
    key = os.fspath(path)
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    missing = "".join(a for a, s in zip("xyz", stated) if s is None)
    logger.warning("%s: no voxel spacing along %s in the file; using %s. If that is wrong, %s.",
                   key, ", ".join(missing), tuple(float(u) for u in used), SPACING_HINT)


def _resolve_spacing(path: Path, given: tuple | None, stated: Sequence[float | None],
                     fallback: tuple | None) -> tuple[tuple[float, float, float], str]:
    """The spacing used and where it came from (see the module docstring for the order)."""
    if given is not None:
        return given, "argument"
    if all(s is not None and s > 0 for s in stated):
        return tuple(float(s) for s in stated), "file"  # type: ignore[return-value]
    if fallback is not None:
        return fallback, "image"
    x, y, z = (s if s is not None and s > 0 else None for s in stated)
    if x is not None and z is None:  # in-plane size known: assume isotropic voxels
        used = (x, y if y is not None else x, x)
    else:
        used = (x or 1.0, y or 1.0, z or 1.0)
    _warn_spacing_once(path, stated, used)
    return used, "default"


def _read_stack(path: str | os.PathLike, role: str, spacing: Sequence[float] | None,
                fallback: tuple | None = None) -> Stack:
    path = Path(path)
    given = check_spacing(spacing)
    _file_exists(path, role)
    kind = _kind(path, role)
    array, stated, meta = (_read_nifti if kind == "nifti" else read_tiff)(path, role)
    if array.size == 0:
        raise InputVolumeError(path, f"the {role} holds no voxel (shape {list(array.shape)})", RECOPY_HINT)
    used, source = _resolve_spacing(path, given, stated, fallback)
    meta["spacing_source"] = source
    if kind == "nifti":
        affine = meta["file_affine"].copy()
        if source != "file":  # keep the orientation, put the spacing used on the diagonal's scale
            norms = np.linalg.norm(affine[:3, :3], axis=0)
            affine[:3, :3] = affine[:3, :3] / np.where(norms > 0, norms, 1.0) * np.asarray(used)
    else:
        affine = np.diag([*used, 1.0]).astype(np.float64)
    return Stack(array, used, kind, affine, path, meta)


def read_image(path: str | os.PathLike, spacing: Sequence[float] | None = None) -> Stack:
    """Read a 3D image stack (TIFF or NIfTI).

    Args:
        path: a ``.tif`` / ``.tiff`` 3D stack or a ``.nii`` / ``.nii.gz`` volume.
        spacing: ``(x, y, z)`` voxel size; overrides what the file states.

    Returns:
        A :class:`Stack` whose ``array`` is ``(X, Y, Z)`` float32. Some NaN / +-Inf voxels are
        replaced by the smallest finite value, with one warning per file.

    Raises:
        InputVolumeError: missing, empty, unreadable or damaged file; not one grey-level 3D stack;
            no finite voxel.
        UsageError: ``spacing`` is not three positive numbers.
    """
    stack = _read_stack(path, "image", spacing)
    values = np.asarray(stack.array, dtype=np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        count = int(values.size - np.count_nonzero(finite))
        if count == values.size:
            raise InputVolumeError(stack.path, f"the image has no finite voxel (all {values.size} are NaN or +-Inf)",
                                   "export it again or remove it from the input")
        fill = float(values[finite].min())
        warn_nonfinite(stack.path, count, int(values.size), f"the smallest finite value ({fill:g})")
        values = np.where(finite, values, np.float32(fill))
    stack.array = np.ascontiguousarray(values)
    return stack


def _integer_labels(path: Path, values: np.ndarray) -> np.ndarray:
    """``values`` as int32 (int64 when needed), or InputVolumeError when they are not object ids."""
    fix = "store instance labels as non-negative integers (0 = background, one id per object)"
    if values.dtype.kind == "f":
        if not np.isfinite(values).all():
            raise InputVolumeError(path, "the label stack holds NaN or +-Inf values", fix)
        if not np.array_equal(values, np.round(values)):
            raise InputVolumeError(path, "the label stack holds non-integer values (an interpolated or "
                                   "probability map?)", fix + ", resampled with nearest neighbour")
    elif values.dtype.kind not in "iub":
        raise InputVolumeError(path, f"the label stack has dtype {values.dtype}, not integers", fix)
    if values.size and values.min() < 0:
        raise InputVolumeError(path, f"the label stack holds negative values (down to {values.min():g})", fix)
    top = float(values.max()) if values.size else 0.0
    return values.astype(np.int32 if top <= np.iinfo(np.int32).max else np.int64)


def read_labels(path: str | os.PathLike, like: Stack | None = None,
                spacing: Sequence[float] | None = None) -> Stack:
    """Read a 3D instance label stack (TIFF or NIfTI): 0 = background, one integer id per object.

    Args:
        path: a ``.tif`` / ``.tiff`` 3D stack or a ``.nii`` / ``.nii.gz`` volume.
        like: the image these labels belong to: the shapes must agree, and when neither
            ``spacing`` nor the file states a spacing, the image's is used (without a warning).
        spacing: ``(x, y, z)`` voxel size; overrides what the file states.

    Returns:
        A :class:`Stack` whose ``array`` is ``(X, Y, Z)`` int32 (int64 for ids beyond int32).

    Raises:
        InputVolumeError: unreadable file, not one 3D stack, values that are not non-negative
            integers, or (with ``like``) a shape different from the image's (naming both files).
    """
    fallback = like.spacing if like is not None else None
    stack = _read_stack(path, "label stack", spacing, fallback)
    stack.array = _integer_labels(stack.path, np.asarray(stack.array))
    if like is not None and stack.shape != like.shape:
        raise InputVolumeError(stack.path, f"the label stack has shape (X, Y, Z) {list(stack.shape)} but its image "
                               f"{like.path} has {list(like.shape)}", "pair each image with its own label stack",
                               others=[like.path])
    return stack


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _temporary_path(path: Path) -> Path:
    """A hidden sibling of ``path`` with the same extension (nibabel picks gzip from the name)."""
    return path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}")


def _label_planes(labels: np.ndarray) -> np.ndarray:
    """``labels`` ``(X, Y, Z)`` checked and cast to uint16 (a label stack's file type)."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be (X, Y, Z), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be >= 0 (0 is the background)")
    return labels


def _as_uint16(path: Path, labels: np.ndarray) -> np.ndarray:
    """``(X, Y, Z)`` labels as uint16; ids beyond 65535 are renumbered 1..n (in order) when n fits."""
    top = int(labels.max()) if labels.size else 0
    if top <= MAX_LABEL:
        return labels.astype(np.uint16)
    ids, inverse = np.unique(labels, return_inverse=True)
    count = int(ids.size - (ids[0] == 0))
    if count > MAX_LABEL:
        raise UsageError(f"{path}: {count} objects, more than a label stack holds ({MAX_LABEL}, uint16 ids); "
                         "split the image into smaller stacks, or raise the minimum object size")
    offset = 0 if ids[0] == 0 else 1  # the background stays 0
    return (inverse.reshape(labels.shape) + offset).astype(np.uint16)


def write_labels(path: str | os.PathLike, labels: np.ndarray, like: Stack) -> Path:
    """Write an instance label stack in the format of ``like`` (the image it was made from).

    Object ids are kept; only when some id exceeds 65535 are the objects renumbered 1..n (in the
    order of their ids). The file is written by :func:`write_stack`: a TIFF with ``like``'s
    spacing, or a NIfTI with the affine and header of ``like``'s file.

    Args:
        path: the output file; its extension should match ``like``'s format.
        labels: ``(X, Y, Z)`` non-negative integer ids, the shape of ``like``.
        like: the image :class:`Stack`.

    Returns:
        ``path``.

    Raises:
        UserError: more than 65535 objects (a uint16 stack cannot hold them).
        ValueError: ``labels`` not ``(X, Y, Z)`` non-negative integers of ``like``'s shape.
    """
    path = Path(path)
    return write_stack(path, _as_uint16(path, _label_planes(labels)), like)


def write_stack(path: str | os.PathLike, array: np.ndarray, like: Stack) -> Path:
    """Write an ``(X, Y, Z)`` array in the format of ``like``; the file appears complete or not at
    all (temporary file, then rename).

    TIFF: an ImageJ hyperstack of ``(Z, Y, X)`` planes with ``like``'s spacing (and unit), which
    :func:`read_image` / :func:`read_labels` read back as the same spacing; when ``like``'s spacing
    was assumed (the file had none), none is written either. NIfTI: with the affine and header of
    the file ``like`` was read from (``like.affine`` for a :func:`new_stack`).

    Args:
        path: the output file.
        array: ``(X, Y, Z)`` uint8, uint16 or float32 (what ImageJ opens), the shape of ``like``.
        like: the :class:`Stack` whose format and grid the file takes.

    Returns:
        ``path``.
    """
    path = Path(path)
    array = np.asarray(array)
    if array.shape != like.shape:
        raise ValueError(f"array has shape {array.shape} but {like.path} has {like.shape}")
    if array.dtype not in (np.uint8, np.uint16, np.float32):
        raise ValueError(f"stacks are written as uint8, uint16 or float32, got {array.dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_path(path)
    try:
        (_write_nifti if like.kind == "nifti" else _write_tiff)(temporary, array, like)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def new_stack(array: np.ndarray, spacing: Sequence[float], kind: str, path: str | os.PathLike,
              unit: str | None = None) -> Stack:
    """A :class:`Stack` made in memory (not read), to write files with :func:`write_stack`.

    Args:
        array: ``(X, Y, Z)`` voxels.
        spacing: ``(x, y, z)`` voxel size, written to the file.
        kind: ``"tiff"`` or ``"nifti"``.
        path: where it will be written (for messages).
        unit: the spacing's unit (e.g. ``"micron"``), None when unknown.
    """
    if kind not in ("tiff", "nifti"):
        raise ValueError(f"kind must be 'tiff' or 'nifti', got {kind!r}")
    used = check_spacing(spacing, "spacing")
    affine = np.diag([*used, 1.0]).astype(np.float64)  # type: ignore[misc]
    return Stack(np.asarray(array), used, kind, affine, Path(path), {"unit": unit, "spacing_source": "argument"})


def _write_tiff(path: Path, array: np.ndarray, like: Stack) -> None:
    """``(X, Y, Z)`` as an ImageJ stack of ``(Z, Y, X)`` planes with ``like``'s spacing."""
    # an assumed spacing (the file stated none) is not written, so the output states none either
    stated = like.meta.get("spacing_source") != "default"
    write_tiff(path, array, like.spacing if stated else None, like.meta.get("unit"))


def _write_nifti(path: Path, array: np.ndarray, like: Stack) -> None:
    """``(X, Y, Z)`` with the affine and header of ``like``'s file, stored unscaled."""
    import nibabel as nib

    header = like.meta.get("header")
    affine = like.meta.get("file_affine", like.affine)
    image = nib.Nifti1Image(array, affine, header=header.copy() if header is not None else None)
    image.set_data_dtype(array.dtype)
    image.header.set_slope_inter(1.0, 0.0)  # voxels (labels above all) are stored as they are, never rescaled
    if like.meta.get("unit") in ("mm", "micron", "meter"):  # the length units a NIfTI header names
        image.header.set_xyzt_units(xyz=like.meta["unit"])
    nib.save(image, path)
