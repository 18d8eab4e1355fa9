"""The distance-map regression target of instance segmentation."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage as ndi


def _check_labels(labels: np.ndarray) -> np.ndarray:
    """``labels`` as an integer array, or ValueError (a float label volume is a caller's mistake)."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"instance labels must be integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("instance labels must be >= 0 (0 is the background)")
    return labels


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    """The voxel spacing as ``ndim`` positive floats (default: 1 along every axis)."""
    if spacing is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or min(spacing) <= 0:
        raise ValueError(f"spacing must be {ndim} positive numbers, got {spacing}")
    return spacing


def _object_distance(mask: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance of each voxel of ``mask`` (one object's bounding box) to the nearest voxel
    outside it, in physical units; 0 outside.

    The box is padded by one background voxel first: an object that fills its box, or lies at
    the volume's edge, still has a boundary there.
    """
    padded = np.pad(mask, 1, constant_values=False)
    dist = ndi.distance_transform_edt(padded, sampling=spacing)
    return dist[(slice(1, -1),) * mask.ndim]


def distance_target(labels: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Per-object normalised distance to the object's boundary.

    For every object ``k`` of ``labels``, each of its voxels gets its Euclidean distance (in the
    units of ``spacing``, so anisotropic voxels are measured correctly) to the nearest voxel that
    is NOT ``k``: background, another object, or outside the volume. The values of the object are
    then divided by their maximum, so every object peaks at exactly 1 whatever its size.

    Because another label counts as boundary, two touching objects fall towards the surface they
    share: the target has a valley between them, where a distance transform of the binary
    foreground would run smoothly across. Voxels next to the boundary get ``step / max`` (> 0),
    never 0; 0 is the background only.

    Each object is processed in its own bounding box (:func:`scipy.ndimage.find_objects`), so the
    cost is the sum of the boxes' sizes, not ``n_objects x volume``.

    Args:
        labels: ``(X, Y, Z)`` (any number of axes works) integer instance labels, 0 = background;
            ids need not be consecutive.
        spacing: voxel size along each axis (e.g. mm or µm); default 1 per axis.

    Returns:
        ``(X, Y, Z)`` float32 in [0, 1]: 0 on the background, maximum 1 within each object.
    """
    labels = _check_labels(labels)
    spacing = _check_spacing(spacing, labels.ndim)
    target = np.zeros(labels.shape, dtype=np.float32)
    for index, box in enumerate(ndi.find_objects(labels)):
        if box is None:  # an id between the present ones that no voxel has
            continue
        mask = labels[box] == index + 1
        dist = _object_distance(mask, spacing)
        # the object's own voxels only: a box may hold parts of its neighbours
        target[box][mask] = (dist[mask] / dist[mask].max()).astype(np.float32)
    return target
