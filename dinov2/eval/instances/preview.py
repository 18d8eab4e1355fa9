"""A PNG of instance labels over their image: every object in its own colour, three mid-planes.

The panels are those of :func:`dinov2.eval.visualisation.montage.montage` (Pillow only, no
plotting library): the XY, XZ and YZ planes (titled axial, coronal, sagittal there) through the
centre of the labelled region, the image alone on the first row and the objects over it on the
second. An object's colour depends on its id only, so it is the same in every panel; its outline
is drawn opaque so that touching objects stay apart.
"""

from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from ..segmentation.preview import display_scaled
from ..visualisation.montage import foreground_center, gray, montage

OVERLAY_ALPHA = 0.45
# The longest side of a panel, in pixels, that small stacks are enlarged to (large ones are not shrunk).
PANEL_PIXELS = 256
MAX_ZOOM = 8.0
_GOLDEN = 0.6180339887498949


def object_colours(ids: np.ndarray) -> np.ndarray:
    """An RGB ``uint8`` ``(n, 3)`` colour per object id: hues a golden-ratio step apart, so ids close
    to each other (neighbours, often) get distant hues; saturation and value vary a little too."""
    colours = []
    for value in np.asarray(ids, dtype=np.int64).ravel().tolist():
        hue = (value * _GOLDEN) % 1.0
        saturation = 0.65 + 0.35 * ((value * 0.37) % 1.0)
        brightness = 0.8 + 0.2 * ((value * 0.71) % 1.0)
        colours.append(colorsys.hsv_to_rgb(hue, saturation, brightness))
    return (np.asarray(colours, dtype=np.float64).reshape(-1, 3) * 255).round().astype(np.uint8)


def instance_overlay(base: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Objects of ``labels`` painted over RGB ``base``: filled half-transparent, outlined opaque.

    Args:
        base: RGB ``uint8`` ``(X, Y, Z, 3)``.
        labels: ``(X, Y, Z)`` non-negative integer ids (0 = background, not drawn).

    Returns:
        RGB ``uint8`` ``(X, Y, Z, 3)``.
    """
    ids, index = np.unique(labels, return_inverse=True)
    index = index.reshape(labels.shape)
    palette = np.concatenate([np.zeros((1, 3), np.uint8), object_colours(ids[1:] if ids[0] == 0 else ids)])
    if ids[0] != 0:
        index = index + 1
    colour = palette[index].astype(np.float64)
    inside = labels != 0
    # an object's outline: its voxels with a face neighbour of another id (background included)
    faces = ndi.generate_binary_structure(labels.ndim, 1)
    outline = inside & (ndi.grey_erosion(labels, footprint=faces) != ndi.grey_dilation(labels, footprint=faces))
    alpha = np.where(outline, 1.0, np.where(inside, OVERLAY_ALPHA, 0.0))[..., None]
    return (base * (1 - alpha) + colour * alpha).round().astype(np.uint8)


def _display_affine(shape: Sequence[int], spacing: Sequence[float] | None) -> np.ndarray:
    """A diagonal affine that keeps the voxels' aspect ratio and enlarges small stacks.

    The montage draws 1 mm per pixel; the spacing of a microscopy stack is in µm (or unknown), so
    only its ratios are kept. Y is flipped so that the XY panel has Y growing downwards, as
    microscopy viewers show it.
    """
    spacing = np.asarray(spacing if spacing is not None else (1.0, 1.0, 1.0), dtype=np.float64)
    relative = spacing / spacing.min()
    zoom = float(np.clip(PANEL_PIXELS / max(np.asarray(shape) * relative), 1.0, MAX_ZOOM))
    return np.diag([relative[0] * zoom, -relative[1] * zoom, relative[2] * zoom, 1.0])


def write_preview(png_path: str | os.PathLike, image: np.ndarray, labels: np.ndarray,
                  spacing: Sequence[float] | None = None, title: str | None = None) -> Path:
    """Write a PNG of ``labels`` over ``image``: the three mid-planes, image above, objects below.

    Args:
        png_path: the PNG file to write (its folder is created).
        image: ``(X, Y, Z)`` intensities (any range: shown between the 0.5th and 99.5th percentiles).
        labels: ``(X, Y, Z)`` non-negative integer instance ids on the same grid (0 = background).
        spacing: ``(x, y, z)`` voxel size, for the panels' aspect ratio (default isotropic).
        title: the second row's title (default ``"<n> objects"``).

    Returns:
        The written path.
    """
    image, labels = np.asarray(image), np.asarray(labels)
    if image.shape != labels.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and labels {labels.shape} must be (X, Y, Z) arrays of one shape")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    base = gray(display_scaled(image.astype(np.float32)))
    count = int(np.count_nonzero(np.unique(labels)))
    rows = [base, instance_overlay(base, labels)]
    titles = ["image", title or f"{count} object{'s' * (count != 1)}"]
    picture = montage(rows, titles, _display_affine(labels.shape, spacing), foreground_center(labels != 0))
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(png_path)
    return png_path
