"""TIFF, the format details of instance-segmentation stacks: reading and writing 3D TIFF files.

What it holds: the lazy ``tifffile`` import (the optional extra ``instances``; scikit-image
depends on it), the capture of what tifffile only logs about a damaged file, the check that a
series is one grey-level Z, Y, X stack (and the ``(Z, Y, X)`` <-> ``(X, Y, Z)`` transpose), the
spacing a TIFF states (OME-XML ``PhysicalSizeX/Y/Z``; ImageJ ``spacing`` = the Z step and
``unit``; ``XResolution`` / ``YResolution`` = pixels per unit, in cm or inch), and the ImageJ
hyperstack writer.

Why it is separate: :mod:`dinov2.eval.instances.io` is the stack API (:class:`~.io.Stack`,
spacing resolution, label checks, atomic writing) and reads without any TIFF quirk; the quirks of
the writers (ImageJ, OME, plain resolution tags) change on their own and live here. Callers use
``io``; only ``io`` imports this module.
"""

from __future__ import annotations

import contextlib
import logging
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from dinov2.data.validation import InputVolumeError

from .postprocess import INSTALL_HINT

# The fix of a file that is there but cannot be used; io.py gives it for empty stacks too.
RECOPY_HINT = "copy or export it again, or remove it from the input"
_EXPECTED = "a 3D grey-level stack: TIFF planes (Z, Y, X), or a 3D NIfTI volume"
# TIFF ResolutionUnit values that are lengths (2 = inch, 3 = centimetre); 1 = none.
_RESOLUTION_UNITS = {2: "inch", 3: "cm"}
# TIFF photometric interpretations of colour pixels (RGB, palette, CMYK, YCbCr, CIELab).
_COLOUR_PHOTOMETRIC = {2, 3, 5, 6, 8}


def _tifffile():
    """The ``tifffile`` module, imported only when a TIFF is read or written (an optional extra)."""
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


def read_tiff(path: Path, role: str) -> tuple[np.ndarray, list[float | None], dict]:
    """Read a 3D TIFF stack.

    Args:
        path: the ``.tif`` / ``.tiff`` file (known to exist and not to be empty).
        role: what the file is, for messages (``"image"``, ``"label stack"``).

    Returns:
        ``(array, spacing, meta)``: ``array`` ``(X, Y, Z)`` in the stored dtype (the planes
        ``(Z, Y, X)`` transposed), ``spacing`` ``[x, y, z]`` as the file states it (None where it
        states none), ``meta`` ``{"unit": str or None}``.

    Raises:
        InputVolumeError: a damaged, truncated or non-TIFF file; colour or multi-channel pixels, a
            time series, 2D, or 4D and more.
        ImportError: tifffile is not installed (the message says how to install it).
    """
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
                            f"TIFF file (tifffile: {first_line})", RECOPY_HINT)


def write_tiff(path: Path, array: np.ndarray, spacing: Sequence[float] | None, unit: str | None) -> None:
    """Write ``array`` as an uncompressed ImageJ hyperstack of ``(Z, Y, X)`` planes.

    Args:
        path: the file to write (replaced if it exists).
        array: ``(X, Y, Z)`` uint8, uint16 or float32 (what ImageJ opens).
        spacing: ``(x, y, z)`` voxel size, written as the resolution tags and the ImageJ Z step
            (:func:`read_tiff` reads it back); None writes no spacing.
        unit: the spacing's unit (ImageJ ``unit``), written only with a spacing; None for none.

    Raises:
        ImportError: tifffile is not installed.
    """
    tifffile = _tifffile()
    metadata: dict[str, Any] = {"axes": "ZYX"}
    kwargs: dict[str, Any] = {}
    if spacing is not None:
        x, y, z = spacing
        kwargs["resolution"] = (1.0 / x, 1.0 / y)
        metadata["spacing"] = z
        if unit:
            metadata["unit"] = unit
    # uncompressed: ImageJ / Fiji open every hyperstack that way
    tifffile.imwrite(path, np.ascontiguousarray(array.transpose(2, 1, 0)), imagej=True, metadata=metadata, **kwargs)
