"""The evaluation volumes on the 2 mm atlas grid, and each hemisphere seen medial side last.

Everything comes from :mod:`dinov2.data.classification_sample` (used as a library): the
Harvard-Oxford lobe map, the FSL MNI152 templates scaled to ``[-1, 1]`` and resampled onto the
atlas grid, and its hemisphere rules (the midline column belongs to no hemisphere; the left
hemisphere is mirrored so both show the midline on the same side).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dinov2.sample_data.classification import (
    TEMPLATES,
    _hemisphere_of_columns,
    _midline_index,
    lobe_index_map,
    template_on_atlas_grid,
)
from dinov2.sample_data.labels import harvard_oxford_label_map

# Intensity of air after scaling (template_on_atlas_grid fills outside its field of view with it).
BACKGROUND = -1.0


@dataclass
class EvidenceVolumes:
    """The atlas and the templates on one grid.

    Attributes:
        regions: uint8 ``(X, Y, Z)`` Harvard-Oxford region values (0 outside the cortex).
        lobes: int8 ``(X, Y, Z)`` lobe index, -1 outside the cortex.
        affine: ``(4, 4)`` voxel-to-world (mm) affine of the grid.
        templates: template name -> float32 ``(X, Y, Z)`` intensities in ``[-1, 1]``.
    """

    regions: np.ndarray
    lobes: np.ndarray
    affine: np.ndarray
    templates: dict[str, np.ndarray]


def load_evidence_volumes(templates: Sequence[str] = tuple(TEMPLATES)) -> EvidenceVolumes:
    """Read the atlas and put every template on its grid (about a second on one CPU thread).

    Args:
        templates: keys of :data:`dinov2.data.classification_sample.TEMPLATES`.

    Returns:
        :class:`EvidenceVolumes` on the ``(91, 109, 91)`` 2 mm MNI grid.

    Raises:
        SampleDataError: the sample-data packages are not installed.
    """
    regions, affine = harvard_oxford_label_map()
    lobes = lobe_index_map(regions)
    images = {name: template_on_atlas_grid(name, affine, lobes.shape) for name in templates}
    return EvidenceVolumes(regions, lobes, affine, images)


@dataclass(frozen=True)
class HemisphereFrame:
    """One hemisphere's voxel columns, in the order the network sees them.

    Frame index ``u`` (0 .. size-1) along axis 0 shows atlas column ``columns[0] + u``, or
    ``columns[1] - 1 - u`` when ``mirrored`` (the left hemisphere, as in the patch task).

    Attributes:
        hemisphere: ``right`` or ``left``.
        columns: atlas columns ``[lo, hi)`` along axis 0 (the midline column excluded).
        mirrored: whether axis 0 is reversed.
        medial_at_end: whether frame index ``size - 1`` is the column next to the midline.
    """

    hemisphere: str
    columns: tuple[int, int]
    mirrored: bool
    medial_at_end: bool

    @property
    def size(self) -> int:
        return self.columns[1] - self.columns[0]

    def atlas_columns(self, u0: int, u1: int) -> tuple[int, int]:
        """Atlas columns ``[lo, hi)`` shown by frame indices ``[u0, u1)`` (inside the frame)."""
        lo, hi = self.columns
        return (hi - u1, hi - u0) if self.mirrored else (lo + u0, lo + u1)

    def frame_index(self, column: int) -> int:
        """Frame index ``u`` of atlas column ``column`` (negative or >= size outside the frame)."""
        lo, hi = self.columns
        return hi - 1 - column if self.mirrored else column - lo

    def cut(self, array: np.ndarray) -> np.ndarray:
        """``(X, Y, Z)`` atlas-grid array -> ``(size, Y, Z)`` view in frame order."""
        part = array[self.columns[0]:self.columns[1]]
        return part[::-1] if self.mirrored else part


def band_rows(affine: np.ndarray, band_mm: Sequence[float]) -> tuple[int, int]:
    """Voxel rows ``[lo, hi)`` along z whose world z lies in ``[band_mm[0], band_mm[1])``."""
    rows = sorted((float(v) - affine[2, 3]) / affine[2, 2] for v in band_mm)
    return math.ceil(rows[0] - 1e-6), math.floor(rows[1] - 1e-6) + 1


def cut_window(frame_array: np.ndarray, origin: Sequence[int], window: int, fill: float) -> np.ndarray:
    """The cube of side ``window`` at ``origin`` of an array, ``fill`` where it reaches past it.

    Args:
        frame_array: ``(A, B, C)`` array (usually a hemisphere frame, so that what lies past it
            -- the midline and the other hemisphere -- comes out as ``fill``).
        origin: corner ``(a, b, c)``; may be negative or reach past the array.
        window: cube side ``W`` in voxels.
        fill: value of the voxels outside the array.

    Returns:
        ``(W, W, W)`` array of ``frame_array``'s dtype.
    """
    out = np.full((window,) * 3, fill, dtype=frame_array.dtype)
    src, dst = [], []
    for start, size in zip(origin, frame_array.shape):
        lo, hi = max(start, 0), min(start + window, size)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    if all(s.stop > s.start for s in src):
        out[tuple(dst)] = frame_array[tuple(src)]
    return out


def hemisphere_frames(affine: np.ndarray, shape: Sequence[int]) -> dict[str, HemisphereFrame]:
    """Both hemispheres' frames of an axis-aligned grid.

    Args:
        affine: ``(4, 4)`` grid affine.
        shape: grid ``(X, Y, Z)``.

    Returns:
        ``{"right": frame, "left": frame}``.
    """
    midline = _midline_index(affine, shape)
    frames = {}
    for lo, hi in ((0, midline), (midline + 1, int(shape[0]))):
        hemisphere = _hemisphere_of_columns(affine, lo, hi)
        mirrored = hemisphere == "left"
        # The column next to the midline is hi-1 for the low side, lo for the high side.
        medial_at_end = (hi == midline) != mirrored
        frames[hemisphere] = HemisphereFrame(hemisphere, (lo, hi), mirrored, medial_at_end)
    return frames
