"""Dense task: every backbone token of a window -> the majority lobe of the cortex in its cube.

Windows (cubes of ``window`` voxels on the 2 mm grid) tile each hemisphere frame (see
:class:`~dinov2.eval.evidence.volumes.HemisphereFrame`) without overlap; windows reaching past
the grid are filled with air (-1). The tiling is laid four times, shifted by 0 or half a token
along x (laterally) and y, so the probe sees four different lattices of token cubes (the
training hemisphere alone would give it little more than a hundred tokens). Splits follow the
patch task's rules with windows instead of patches: a window lies wholly in one hemisphere; the
test hemisphere's windows are the test split; in the training hemisphere, windows wholly inside
the validation band are validation and windows not touching it are training.

The band: the patch task's band (world z in [0, 32) mm, 16 rows) cannot hold a 32-voxel window,
so the dense band is that band grown, about its centre, to a whole number of windows (32 rows:
z in [-16, 48) mm), and the z tiling starts at its lower edge; the layers below and above it
are training.

A token is labelled when at least :data:`MIN_CORTICAL_FRACTION` of its cube is cortex (atlas >
0), by the lobe with most voxels there (ties: the lower lobe index); other tokens are left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product
from typing import Sequence

import numpy as np
import torch

from dinov2.data.classification_sample import PatchTaskParams

from .errors import EvidenceError
from .patch_task import PATCH_PARAMS
from .tasks import NUM_CLASSES, SPLITS, TaskData, TaskSplit
from .volumes import BACKGROUND, EvidenceVolumes, HemisphereFrame, cut_window, hemisphere_frames

MIN_CORTICAL_FRACTION = 0.25


@dataclass(frozen=True)
class DenseWindow:
    """One window of the tiling.

    Attributes:
        hemisphere: ``right`` or ``left``.
        split: ``training``, ``validation`` or ``test``.
        origin: corner ``(u, j, k)`` in the hemisphere frame (may be negative: padding).
        atlas_box: atlas voxel ranges ``((x0, x1), (y0, y1), (z0, z1))`` of the real (unpadded)
            voxels the window shows.
    """

    hemisphere: str
    split: str
    origin: tuple[int, int, int]
    atlas_box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def band_rows(affine: np.ndarray, band_mm: Sequence[float]) -> tuple[int, int]:
    """Voxel rows ``[lo, hi)`` along z whose world z lies in ``[band_mm[0], band_mm[1])``."""
    rows = sorted((float(v) - affine[2, 3]) / affine[2, 2] for v in band_mm)
    return math.ceil(rows[0] - 1e-6), math.floor(rows[1] - 1e-6) + 1


def dense_band_rows(patch_band: tuple[int, int], window: int) -> tuple[int, int]:
    """The patch band grown about its centre to a whole number of windows: rows ``[lo, hi)``."""
    height = window * math.ceil((patch_band[1] - patch_band[0]) / window)
    lo = (patch_band[0] + patch_band[1] - height) // 2
    return lo, lo + height


def tile_starts(size: int, window: int, anchor: int) -> list[int]:
    """Starts of non-overlapping windows covering ``[0, size)``, one of them at ``anchor`` (mod window)."""
    first = anchor % window
    if first > 0:
        first -= window
    return list(range(first, size, window))


def _split_of(frame: HemisphereFrame, z: tuple[int, int], band: tuple[int, int], train_hemisphere: str) -> str | None:
    if frame.hemisphere != train_hemisphere:
        return "test"
    if band[0] <= z[0] and z[1] <= band[1]:
        return "validation"
    if z[1] <= band[0] or z[0] >= band[1]:
        return "training"
    return None  # training hemisphere, touching the band


def plan_dense_windows(shape: Sequence[int], affine: np.ndarray, window: int, shifts: Sequence[int] = (0,),
                       params: PatchTaskParams = PATCH_PARAMS) -> list[DenseWindow]:
    """Every window of both hemispheres with its split (before any image is read).

    Args:
        shape: atlas grid ``(X, Y, Z)``.
        affine: its ``(4, 4)`` affine.
        window: window side in voxels.
        shifts: voxel shifts of the tiling along x (laterally) and y; every pair is laid.
        params: the patch task's recipe (training hemisphere, validation band).

    Returns:
        Windows sorted by split, hemisphere and origin.
    """
    band = dense_band_rows(band_rows(affine, params.val_band_mm), window)
    windows = []
    for frame, sx, sy in product(hemisphere_frames(affine, shape).values(), shifts, shifts):
        # Unshifted x tiles end at the midline; a shift moves them laterally, never across it.
        medial = frame.size - sx if frame.medial_at_end else sx
        xs = tile_starts(frame.size, window, medial)
        ys = tile_starts(shape[1], window, (shape[1] - window * math.ceil(shape[1] / window)) // 2 + sy)
        zs = tile_starts(shape[2], window, band[0])
        for u in xs:
            x_box = frame.atlas_columns(max(u, 0), min(u + window, frame.size))
            for j in ys:
                for k in zs:
                    z_box = (max(k, 0), min(k + window, shape[2]))
                    split = _split_of(frame, (k, k + window), band, params.train_hemisphere)
                    if split is not None:
                        box = (x_box, (max(j, 0), min(j + window, shape[1])), z_box)
                        windows.append(DenseWindow(frame.hemisphere, split, (u, j, k), box))
    order = {s: i for i, s in enumerate(SPLITS)}
    windows.sort(key=lambda w: (order[w.split], w.hemisphere, w.origin))
    return windows


def to_token_cubes(cube: np.ndarray | torch.Tensor, patch: Sequence[int]):
    """``(..., H, W, D)`` -> ``(..., h*w*d, ph*pw*pd)``: token cubes in the backbone's token order."""
    *lead, H, W, D = cube.shape
    ph, pw, pd = patch
    x = cube.reshape(*lead, H // ph, ph, W // pw, pw, D // pd, pd)
    n = len(lead)
    order = (*range(n), n, n + 2, n + 4, n + 1, n + 3, n + 5)
    x = x.transpose(order) if isinstance(x, np.ndarray) else x.permute(order)
    return x.reshape(*lead, (H // ph) * (W // pw) * (D // pd), ph * pw * pd)


def token_labels(lobe_window: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """Label of every token of a window.

    Args:
        lobe_window: int ``(W, W, W)`` lobe indices, -1 outside the cortex.
        patch: token cube ``(ph, pw, pd)``.

    Returns:
        int64 ``(h*w*d,)``: the majority lobe, or -1 for a token with less than
        :data:`MIN_CORTICAL_FRACTION` cortex.
    """
    cubes = to_token_cubes(lobe_window, patch)
    counts = np.stack([(cubes == c).sum(axis=1) for c in range(NUM_CLASSES)], axis=1)
    labelled = counts.sum(axis=1) >= MIN_CORTICAL_FRACTION * cubes.shape[1]
    return np.where(labelled, counts.argmax(axis=1), -1).astype(np.int64)


def _require_lobes(split: str, labels: list[int], window: int) -> None:
    """Every lobe in training and test (so chance is 1/5), two in validation (to choose anything)."""
    present = len(set(labels))
    if present < (2 if split == "validation" else NUM_CLASSES):
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=NUM_CLASSES).tolist()
        raise EvidenceError(f"--dense-window {window} leaves the dense task's {split} split with tokens of "
                            f"{present} lobe(s) (tokens per lobe {counts}): the validation band grows to a whole "
                            "window, and little brain is left outside it. Use a smaller --dense-window, e.g. 32.")


def build_dense_task(volumes: EvidenceVolumes, window: int, patch: Sequence[int],
                     params: PatchTaskParams = PATCH_PARAMS) -> TaskData:
    """Windows and token labels of every split, from every template.

    Args:
        volumes: atlas and templates on one grid.
        window: window side in voxels (a multiple of every side of ``patch``).
        patch: the backbone's patch ``(ph, pw, pd)`` (= the labelled token cube).
        params: the patch task's recipe (training hemisphere, validation band, templates).

    Returns:
        :class:`TaskData` whose splits hold ``(M, 1, W, W, W)`` windows (only those with a
        labelled token), ``(T, 2)`` token indices and ``(T,)`` labels.

    Raises:
        EvidenceError: the window is so large that a split lacks lobes.
    """
    frames = hemisphere_frames(volumes.affine, volumes.lobes.shape)
    shifts = sorted({0, min(patch[:2]) // 2})
    planned = plan_dense_windows(volumes.lobes.shape, volumes.affine, window, shifts, params)
    lobe_frames = {h: f.cut(volumes.lobes) for h, f in frames.items()}
    splits = {}
    for split in SPLITS:
        cubes, tokens, labels = [], [], []
        for name in params.templates:
            image_frames = {h: f.cut(volumes.templates[name]) for h, f in frames.items()}
            for w in (w for w in planned if w.split == split):
                labels_w = token_labels(cut_window(lobe_frames[w.hemisphere], w.origin, window, -1), patch)
                kept = np.flatnonzero(labels_w >= 0)
                if kept.size == 0:
                    continue  # no labelled token: no need to run the network on it
                tokens.extend((len(cubes), int(t)) for t in kept)
                labels.extend(labels_w[kept].tolist())
                cubes.append(cut_window(image_frames[w.hemisphere], w.origin, window, BACKGROUND))
        _require_lobes(split, labels, window)
        inputs = torch.from_numpy(np.stack(cubes)).unsqueeze(1).float()
        splits[split] = TaskSplit(inputs, torch.tensor(labels, dtype=torch.int64),
                                  torch.tensor(tokens, dtype=torch.int64).reshape(-1, 2))
    band = dense_band_rows(band_rows(volumes.affine, params.val_band_mm), window)
    band_mm = [float(volumes.affine[2, 2] * r + volumes.affine[2, 3]) for r in band]
    info = {"window_voxels": window, "token_voxels": list(patch), "tiling_shifts_voxels": shifts,
            "validation_band_rows": list(band),
            "validation_band_mm": band_mm, "min_cortical_fraction": MIN_CORTICAL_FRACTION,
            "windows": {s: int(splits[s].inputs.shape[0]) for s in SPLITS},
            "class_counts": {s: splits[s].class_counts() for s in SPLITS}}
    return TaskData("dense", splits, info)
