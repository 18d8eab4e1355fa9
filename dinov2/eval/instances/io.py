"""The one way in and out for the image and label stacks of instance segmentation: TIFF and NIfTI.

Every array is ``(X, Y, Z)``, as everywhere in this project. A 3D TIFF stores its planes as
``(Z, Y, X)``; it is transposed on reading and back on writing. NIfTI keeps its own array order.

Voxel spacing (:attr:`Stack.spacing`, one value per array axis, in the unit the file states, see
``meta["unit"]``) comes from, first to last:

1. the ``spacing`` argument (the ``--spacing`` flag, or a datalist entry's ``"spacing": [x, y, z]``);
2. the file: ImageJ metadata (``spacing`` = the Z step; ``XResolution`` / ``YResolution`` = pixels
   per unit), OME-XML ``PhysicalSizeX/Y/Z``, TIFF resolution in cm or inch, or the NIfTI header;
3. for a label stack read with ``like=``, the image's spacing;
4. 1.0, with ONE warning per file naming it and how to give the spacing. A file that has its
   in-plane spacing but no Z step gets the X spacing along Z (isotropic voxels), with the warning.

Bad files raise :class:`~dinov2.data.validation.InputVolumeError` (a ``UserError``): one line that
names the file, what is wrong and what to do. NIfTI files are checked by
:func:`dinov2.data.validation.read_volume` (empty, not NIfTI, truncated, 2D, 4D series, 5D), the
same checks and words as every other command of the package.

TIFF reading needs ``tifffile``, which comes with the optional extra ``instances``
(scikit-image depends on it); it is imported only when a TIFF is read or written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from dinov2.data.image_io import is_nifti_path
from dinov2.data.validation import InputVolumeError, read_error, read_volume, warn_nonfinite
from dinov2.utils.errors import UsageError

from .postprocess import INSTALL_HINT

logger = logging.getLogger("dinov2.eval.instances.io")

TIFF_SUFFIXES = (".tif", ".tiff")
STACK_SUFFIXES = TIFF_SUFFIXES + (".nii.gz", ".nii")
MAX_LABEL = np.iinfo(np.uint16).max
SPACING_HINT = 'give it as "spacing": [x, y, z] in the datalist entry, or --spacing X Y Z on the command line'
_RECOPY = "copy or export it again, or remove it from the input"
_EXPECTED = "a 3D grey-level stack: TIFF planes (Z, Y, X), or a 3D NIfTI volume"
# TIFF ResolutionUnit values that are lengths (2 = inch, 3 = centimetre); 1 = none.
_RESOLUTION_UNITS = {2: "inch", 3: "cm"}
# TIFF photometric interpretations of colour pixels (RGB, palette, CMYK, YCbCr, CIELab).
_COLOUR_PHOTOMETRIC = {2, 3, 5, 6, 8}


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
        raise InputVolumeError(path, f"the {role} file is empty (0 bytes)", _RECOPY)


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
# TIFF
# --------------------------------------------------------------------------------------------


def _tifffile():
    try:
        import tifffile
    except ImportError as error:
        raise ImportError(f"reading TIFF stacks needs tifffile, which is not installed: {INSTALL_HINT}") from error
    return tifffile


@contextlib.contextmanager
def _tifffile_warnings() -> Iterator[list[str]]:
    """Collect (and keep off the console) what tifffile logs while a file is read: tifffile reads a
    damaged file partly and only logs it ("invalid page offset", "corrupted file")."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    tiff_logger = logging.getLogger("tifffile")
    handler, propagate = Collect(logging.WARNING), tiff_logger.propagate
    tiff_logger.addHandler(handler)
    tiff_logger.propagate = False
    try:
        yield messages
    finally:
        tiff_logger.removeHandler(handler)
        tiff_logger.propagate = propagate


def _zyx_planes(path: Path, axes: str, shape: Sequence[int], photometric: int, role: str) -> list[int]:
    """The array axes of a TIFF series that are kept (the non-singleton ones), checked to be Z, Y, X.

    Raises:
        InputVolumeError: colour or multi-channel pixels, a time series, 2D, or 4D and more.
    """
    shape = [int(s) for s in shape]
    keep = [i for i, n in enumerate(shape) if n > 1]
    described = f"shape {shape}, axes {axes}"
    for i in keep:
        if axes[i] == "C" or (axes[i] == "S" and photometric in _COLOUR_PHOTOMETRIC):
            raise InputVolumeError(path, f"the {role} has {shape[i]} channels ({described}); expected {_EXPECTED}",
                                   "save one channel per file (e.g. Image > Color > Split Channels in Fiji)")
        if axes[i] == "T":
            raise InputVolumeError(path, f"the {role} is a time series of {shape[i]} frames ({described}); "
                                   f"expected {_EXPECTED}", "save one 3D stack per time point")
    if len(keep) != 3:
        raise InputVolumeError(path, f"the {role} is {len(keep)}D ({described}); expected {_EXPECTED}",
                               "give the 3D stack (a single plane or a 4D+ file cannot be used)")
    return keep


def _resolution(page, name: str) -> float | None:
    """Pixel size along one axis from an ``XResolution`` / ``YResolution`` tag (pixels per unit)."""
    tag = page.tags.get(name)
    if tag is None:
        return None
    numerator, denominator = tag.value
    if not numerator or not denominator:
        return None
    return float(denominator) / float(numerator)


def _ome_spacing(ome_xml: str | None) -> tuple[list[float | None], str | None]:
    """``([x, y, z] or None each, unit)`` of the first OME ``Pixels`` element."""
    if not ome_xml:
        return [None, None, None], None
    try:
        root = ElementTree.fromstring(ome_xml)
    except ElementTree.ParseError:
        return [None, None, None], None
    pixels = next((e for e in root.iter() if e.tag.endswith("Pixels")), None)
    if pixels is None:
        return [None, None, None], None
    values = [pixels.get(f"PhysicalSize{a}") for a in "XYZ"]
    sizes = [float(v) if v not in (None, "") else None for v in values]
    return sizes, pixels.get("PhysicalSizeXUnit", "µm")


def _tiff_spacing(tif) -> tuple[list[float | None], str | None]:
    """``([x, y, z] or None each, unit)`` stated in a TIFF (ImageJ, OME or resolution tags)."""
    page = tif.pages[0]
    imagej = tif.imagej_metadata or {}
    if tif.is_ome:
        sizes, unit = _ome_spacing(tif.ome_metadata)
        if any(s is not None for s in sizes):
            return sizes, unit
    unit_code = int(page.tags["ResolutionUnit"].value) if "ResolutionUnit" in page.tags else 2
    unit = imagej.get("unit") or _RESOLUTION_UNITS.get(unit_code)
    x, y = _resolution(page, "XResolution"), _resolution(page, "YResolution")
    z = imagej.get("spacing")
    # (1, 1) without a unit is the writers' default, not a statement; ImageJ writes a Z step only
    # for a calibrated stack, so with one the in-plane sizes are meant too
    stated_in_plane = unit not in (None, "pixel") or z is not None or (x, y) not in ((1.0, 1.0), (None, None))
    return [x if stated_in_plane else None, y if stated_in_plane else None,
            float(z) if z is not None else None], (unit if unit != "pixel" else None)


def _read_tiff(path: Path, role: str) -> tuple[np.ndarray, list[float | None], dict]:
    """``(array (X, Y, Z) as stored, [x, y, z] spacing or None each, meta)`` of a TIFF stack."""
    tifffile = _tifffile()
    with _tifffile_warnings() as warnings:
        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                keep = _zyx_planes(path, series.axes, series.shape, int(tif.pages[0].photometric), role)
                planes = series.asarray()
                sizes, unit = _tiff_spacing(tif)
        except Exception as exc:  # noqa: BLE001 - tifffile fails in many ways on damaged files
            # a damaged file may also be read in part (one plane: "2D"); its warning is the real cause
            damage = _damage(warnings)
            if damage is None and isinstance(exc, InputVolumeError):
                raise
            raise _tiff_error(path, role, damage or f"{type(exc).__name__}: {exc}") from exc
    damage = _damage(warnings)
    if damage is not None:
        raise _tiff_error(path, role, damage)
    planes = planes.reshape([int(series.shape[i]) for i in keep])
    return np.ascontiguousarray(planes.transpose(2, 1, 0)), sizes, {"unit": unit}


def _damage(warnings: Sequence[str]) -> str | None:
    """The first thing tifffile logged that says the file is damaged, or None."""
    return next((m for m in warnings if any(w in m.lower() for w in ("invalid", "corrupt", "truncat"))), None)


def _tiff_error(path: Path, role: str, detail: str) -> InputVolumeError:
    first_line = (detail.strip().splitlines() or [""])[0][:160]
    return InputVolumeError(path, f"the {role} cannot be read as a TIFF stack: it is damaged, truncated or not a "
                            f"TIFF file (tifffile: {first_line})", _RECOPY)


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
    array, stated, meta = (_read_nifti if kind == "nifti" else _read_tiff)(path, role)
    if array.size == 0:
        raise InputVolumeError(path, f"the {role} holds no voxel (shape {list(array.shape)})", _RECOPY)
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
    tifffile = _tifffile()
    metadata: dict[str, Any] = {"axes": "ZYX"}
    kwargs: dict[str, Any] = {}
    if like.meta.get("spacing_source") != "default":
        x, y, z = like.spacing
        kwargs["resolution"] = (1.0 / x, 1.0 / y)
        metadata["spacing"] = z
        if like.meta.get("unit"):
            metadata["unit"] = like.meta["unit"]
    # uncompressed: ImageJ / Fiji open every hyperstack that way
    tifffile.imwrite(path, np.ascontiguousarray(array.transpose(2, 1, 0)), imagej=True, metadata=metadata, **kwargs)


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
