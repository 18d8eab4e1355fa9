"""Instance labels from a (predicted) distance map: seeded watershed with two thresholds."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage as ndi

INSTALL_HINT = "pip install 'dinov2-3d[instances]'"


def _watershed() -> Callable[..., np.ndarray]:
    """``skimage.segmentation.watershed``, imported only when used (optional extra)."""
    try:
        from skimage.segmentation import watershed
    except ImportError as error:
        raise ImportError(
            f"instance post-processing needs scikit-image, which is not installed: {INSTALL_HINT}"
        ) from error
    return watershed


def min_size_voxels(min_voxels: int = 0, min_ml: float = 0.0, spacing: Sequence[float] | None = None) -> int:
    """The smallest object size kept, in voxels: the larger of ``min_voxels`` and ``min_ml``.

    ``min_ml`` is a volume in millilitres (1 mL = 1000 mm^3) and needs ``spacing`` in mm per axis.
    """
    if min_voxels < 0 or min_ml < 0:
        raise ValueError("minimum object sizes must be >= 0")
    if min_ml == 0:
        return int(min_voxels)
    if spacing is None:
        raise ValueError("a minimum size in mL needs the voxel spacing in mm")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return max(int(min_voxels), math.ceil(min_ml / voxel_ml))


def relabel_by_size(labels: np.ndarray, min_voxels: int = 0) -> np.ndarray:
    """Drop objects smaller than ``min_voxels`` and number the rest 1..n (in order of old id).

    Args:
        labels: ``(X, Y, Z)`` non-negative integer labels, 0 = background.
        min_voxels: objects with fewer voxels become background.

    Returns:
        ``(X, Y, Z)`` int32 labels with consecutive ids.
    """
    sizes = np.bincount(labels.ravel())
    keep = sizes >= max(min_voxels, 1)  # an id no voxel has is dropped too
    keep[0] = False
    new_ids = np.zeros(sizes.size, dtype=np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return new_ids[labels]


def instances_from_distance(
    dist: np.ndarray,
    cells_max: float,
    cell_fill: float,
    min_voxels: int = 0,
    min_ml: float = 0.0,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Seeded watershed of a distance map into instance labels.

    1. markers: the face-connected regions of ``dist > cells_max`` (each object's peak);
    2. mask: ``dist > cell_fill`` (everything that belongs to some object);
    3. watershed of ``-dist`` from the markers inside the mask, so each marker grows downhill
       until it meets a neighbour's region in the valley between them. A mask region holding no
       marker stays background;
    4. objects smaller than the minimum size (:func:`min_size_voxels`) are removed, and the rest
       numbered 1..n.

    Args:
        dist: ``(X, Y, Z)`` float, a target of :func:`.targets.distance_target` or a prediction
            of it (any scale: the thresholds are in its units).
        cells_max: peak threshold; must be greater than ``cell_fill``.
        cell_fill: foreground threshold.
        min_voxels, min_ml, spacing: the minimum object size, in voxels and/or mL (spacing in mm).

    Returns:
        ``(X, Y, Z)`` int32 instance labels, 0 = background, ids 1..n.
    """
    if not cell_fill < cells_max:
        raise ValueError(f"cell_fill ({cell_fill}) must be smaller than cells_max ({cells_max})")
    dist = np.asarray(dist, dtype=np.float32)
    min_size = min_size_voxels(min_voxels, min_ml, spacing)
    markers, _ = ndi.label(dist > cells_max)
    labels = _watershed()(-dist, markers=markers, mask=dist > cell_fill)
    return relabel_by_size(labels, min_size)
