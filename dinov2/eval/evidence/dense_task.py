"""Dense task: every backbone token of a window -> the majority lobe of the cortex in its cube.

Windows (cubes of ``window`` voxels on the 2 mm grid) tile each hemisphere frame (see
:class:`~dinov2.eval.evidence.volumes.HemisphereFrame`) without overlap; windows reaching past
the grid are filled with air (-1). The tiling is laid four times, shifted by 0 or half a token
along x (laterally) and y, so the probe sees four different lattices of token cubes. A window
lies wholly in one hemisphere: the test hemisphere's windows are the test split, and every
window of the training hemisphere is training (nothing is held back there: the probe's L2
penalty is chosen by cross-validation over spatial folds of the training tokens, :mod:`.folds`).

The z tiling starts where it always has, at the lower edge of the patch task's validation band
(world z in [0, 32) mm) grown about its centre to a whole number of windows (32-voxel windows:
row 28, z = -16 mm), so the test windows are exactly those of earlier versions. Tokens lie on
one z lattice in every shifted tiling, so two tokens either share all their z rows or none, and
a z-slab fold never splits a token cube. A window's tokens may fall in two folds, and windows of
the shifted tilings overlap: the backbone's attention lets them share context with the held-out
fold, unless ``--cv-buffer`` drops every token whose window overlaps a held-out token's window
(each token carries its centre and its window's box of atlas voxels for that).

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

from dinov2.sample_data.classification import PatchTaskParams

from .errors import EvidenceError
from .folds import DEFAULT_BLOCK_MM, DEFAULT_BUFFER, DEFAULT_FOLDS, DEFAULT_GROUPING, attach_folds
from .patch_task import PATCH_PARAMS
from .tasks import NUM_CLASSES, SPLITS, TaskData, TaskSplit, world_mm
from .volumes import BACKGROUND, EvidenceVolumes, HemisphereFrame, band_rows, cut_window, hemisphere_frames

MIN_CORTICAL_FRACTION = 0.25


@dataclass(frozen=True)
class DenseWindow:
    """One window of the tiling.

    Attributes:
        hemisphere: ``right`` or ``left``.
        split: ``training`` (training hemisphere) or ``test``.
        origin: corner ``(u, j, k)`` in the hemisphere frame (may be negative: padding).
        atlas_box: atlas voxel ranges ``((x0, x1), (y0, y1), (z0, z1))`` of the real (unpadded)
            voxels the window shows.
    """

    hemisphere: str
    split: str
    origin: tuple[int, int, int]
    atlas_box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def dense_band_rows(patch_band: tuple[int, int], window: int) -> tuple[int, int]:
    """The patch band grown about its centre to a whole number of windows: rows ``[lo, hi)``."""
    height = window * math.ceil((patch_band[1] - patch_band[0]) / window)
    lo = (patch_band[0] + patch_band[1] - height) // 2
    return lo, lo + height


def z_anchor_row(affine: np.ndarray, window: int, params: PatchTaskParams = PATCH_PARAMS) -> int:
    """Row where a window of the z tiling starts: the lower edge of the grown validation band."""
    return dense_band_rows(band_rows(affine, params.val_band_mm), window)[0]


def tile_starts(size: int, window: int, anchor: int) -> list[int]:
    """Starts of non-overlapping windows covering ``[0, size)``, one of them at ``anchor`` (mod window)."""
    first = anchor % window
    if first > 0:
        first -= window
    return list(range(first, size, window))


def plan_dense_windows(shape: Sequence[int], affine: np.ndarray, window: int, shifts: Sequence[int] = (0,),
                       params: PatchTaskParams = PATCH_PARAMS) -> list[DenseWindow]:
    """Every window of both hemispheres with its split (before any image is read).

    Args:
        shape: atlas grid ``(X, Y, Z)``.
        affine: its ``(4, 4)`` affine.
        window: window side in voxels.
        shifts: voxel shifts of the tiling along x (laterally) and y; every pair is laid.
        params: the patch task's recipe (training hemisphere; its band anchors the z tiling).

    Returns:
        Windows sorted by split, hemisphere and origin.
    """
    zs = tile_starts(shape[2], window, z_anchor_row(affine, window, params))
    windows = []
    for frame, sx, sy in product(hemisphere_frames(affine, shape).values(), shifts, shifts):
        split = "training" if frame.hemisphere == params.train_hemisphere else "test"
        # Unshifted x tiles end at the midline; a shift moves them laterally, never across it.
        medial = frame.size - sx if frame.medial_at_end else sx
        xs = tile_starts(frame.size, window, medial)
        ys = tile_starts(shape[1], window, (shape[1] - window * math.ceil(shape[1] / window)) // 2 + sy)
        for u, j, k in product(xs, ys, zs):
            box = (frame.atlas_columns(max(u, 0), min(u + window, frame.size)),
                   (max(j, 0), min(j + window, shape[1])), (max(k, 0), min(k + window, shape[2])))
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
    """Every lobe in training and test, so that chance is 1/5 and the probe can name every lobe."""
    present = len(set(labels))
    if present < NUM_CLASSES:
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=NUM_CLASSES).tolist()
        raise EvidenceError(f"--dense-window {window} leaves the dense task's {split} split with tokens of "
                            f"{present} lobe(s) (tokens per lobe {counts}). Use a smaller --dense-window, e.g. 32.")


def _token_centres_mm(windows: list[DenseWindow], tokens: np.ndarray, window: int, patch: Sequence[int],
                      affine: np.ndarray, frames: dict[str, HemisphereFrame]) -> torch.Tensor:
    """float64 ``(T, 3)`` world ``(x, y, z)`` of the middle of every token cube.

    Args:
        windows: the split's kept windows, in input order.
        tokens: int ``(T, 2)`` ``(window index, token index)``; ``d`` (z) is the fastest token axis.
        window: window side in voxels.
        patch: token cube ``(ph, pw, pd)``.
        affine: the grid's ``(4, 4)`` affine.
        frames: the hemisphere frames the windows were cut from.
    """
    ph, pw, pd = patch
    per_w, per_d = window // pw, window // pd
    index = tokens[:, 1]  # (h, w, d) flattened with d fastest
    a, b, c = index // (per_w * per_d), (index // per_d) % per_w, index % per_d
    owner = [windows[i] for i in tokens[:, 0]]
    origins = np.array([w.origin for w in owner], dtype=np.float64).reshape(-1, 3)
    lo, hi = (np.array([frames[w.hemisphere].columns[i] for w in owner], dtype=np.float64) for i in (0, 1))
    mirrored = np.array([frames[w.hemisphere].mirrored for w in owner], dtype=bool)
    u0 = origins[:, 0] + ph * a
    # Frame columns [u0, u0 + ph) are atlas columns [lo + u0, lo + u0 + ph), or mirrored [hi - u0 - ph, hi - u0).
    x = np.where(mirrored, hi - u0 - (ph + 1) / 2, lo + u0 + (ph - 1) / 2)
    y = origins[:, 1] + pw * b + (pw - 1) / 2
    z = origins[:, 2] + pd * c + (pd - 1) / 2
    return world_mm(affine, np.stack([x, y, z], axis=1))


def _cut_split(volumes: EvidenceVolumes, planned: list[DenseWindow], window: int, patch: Sequence[int],
               params: PatchTaskParams) -> TaskSplit:
    """Windows with a labelled token, from every template in turn, with their token labels and z."""
    frames = hemisphere_frames(volumes.affine, volumes.lobes.shape)
    lobe_frames = {h: f.cut(volumes.lobes) for h, f in frames.items()}
    labelled = []  # (window, kept token indices, their labels), the same for every template
    for w in planned:
        labels_w = token_labels(cut_window(lobe_frames[w.hemisphere], w.origin, window, -1), patch)
        kept = np.flatnonzero(labels_w >= 0)
        if kept.size:  # a window without a labelled token need not go through the network
            labelled.append((w, kept, labels_w[kept]))
    cubes, tokens, labels = [], [], []
    for name in params.templates:
        image_frames = {h: f.cut(volumes.templates[name]) for h, f in frames.items()}
        for w, kept, labels_w in labelled:
            tokens.append(np.stack([np.full_like(kept, len(cubes)), kept], axis=1))
            labels.append(labels_w)
            cubes.append(cut_window(image_frames[w.hemisphere], w.origin, window, BACKGROUND))
    tokens_np = np.concatenate(tokens).astype(np.int64)
    windows = [w for _ in params.templates for w, _, _ in labelled]
    # A token's input is its whole window (its tokens attend to each other): the window's real voxels.
    boxes = np.array([np.array(w.atlas_box).T for w in windows], dtype=np.int64)[tokens_np[:, 0]]
    return TaskSplit(torch.from_numpy(np.stack(cubes)).unsqueeze(1).float(),
                     torch.from_numpy(np.concatenate(labels).astype(np.int64)), torch.from_numpy(tokens_np),
                     _token_centres_mm(windows, tokens_np, window, patch, volumes.affine, frames),
                     torch.from_numpy(boxes))


def build_dense_task(volumes: EvidenceVolumes, window: int, patch: Sequence[int],
                     params: PatchTaskParams = PATCH_PARAMS, folds: int = DEFAULT_FOLDS,
                     grouping: str = DEFAULT_GROUPING, block_mm: float = DEFAULT_BLOCK_MM,
                     buffer: bool = DEFAULT_BUFFER) -> TaskData:
    """Windows and token labels of both splits, from every template.

    Args:
        volumes: atlas and templates on one grid.
        window: window side in voxels (a multiple of every side of ``patch``).
        patch: the backbone's patch ``(ph, pw, pd)`` (= the labelled token cube).
        params: the patch task's recipe (training hemisphere, z anchor, templates).
        folds, grouping, block_mm, buffer: cross-validation folds of the training tokens, how they
            are grouped, the block side and whether fits keep off the held-out fold's windows (see
            :func:`~dinov2.eval.evidence.folds.attach_folds`).

    Returns:
        :class:`TaskData` whose splits hold ``(M, 1, W, W, W)`` windows (only those with a
        labelled token), ``(T, 2)`` token indices, ``(T,)`` labels, token centres and window
        boxes; ``folds`` and ``fitted_on`` set.

    Raises:
        EvidenceError: the window is so large that a split lacks lobes, or ``folds`` does not fit.
    """
    shifts = sorted({0, min(patch[:2]) // 2})
    planned = plan_dense_windows(volumes.lobes.shape, volumes.affine, window, shifts, params)
    splits = {}
    for split in SPLITS:
        splits[split] = _cut_split(volumes, [w for w in planned if w.split == split], window, patch, params)
        _require_lobes(split, splits[split].labels.tolist(), window)
    anchor = z_anchor_row(volumes.affine, window, params)
    info = {"window_voxels": window, "token_voxels": list(patch), "tiling_shifts_voxels": shifts,
            "splits": "training: every window of the training hemisphere; test: every window of the other one",
            "z_tiling_anchor_row": anchor,
            "z_tiling_anchor_mm": float(volumes.affine[2, 2] * anchor + volumes.affine[2, 3]),
            "min_cortical_fraction": MIN_CORTICAL_FRACTION,
            "windows": {s: int(splits[s].inputs.shape[0]) for s in SPLITS},
            "examples": {s: int(splits[s].labels.numel()) for s in SPLITS},
            "class_counts": {s: splits[s].class_counts() for s in SPLITS}}
    return attach_folds(TaskData("dense", splits, info), folds, grouping, block_mm, buffer)
