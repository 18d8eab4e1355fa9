"""Patch task: the ``N^3``-voxel cube around each classification_sample site -> the lobe at its centre.

Sites and labels are those of :mod:`dinov2.data.classification_sample` (16^3-voxel = 32 mm
patches at a 4-voxel stride on the 2 mm atlas grid, labelled by the lobe at the patch centre).
The network is fed the cube of ``patch_size`` (``N``) voxels centred on the same labelled voxel,
so ``N = 16`` gives exactly classification_sample's patches and a larger ``N`` adds context
around the same label (with only 32 mm, a linear probe on anything saturates near the same
accuracy):

* along each atlas axis the cube spans ``[c - N//2, c - N//2 + N)`` around the centre voxel
  ``c`` (the 16-voxel patch sits in its middle); left-hemisphere cubes are then mirrored along x,
  as the patches are, which puts the centre at index ``N - 1 - N//2`` instead of ``N//2``;
* voxels beyond the atlas grid are air (:data:`~dinov2.eval.evidence.volumes.BACKGROUND`);
* the cube is cut from the site's hemisphere frame, so the midline column and every voxel of the
  other hemisphere are air too: no input ever shows the other hemisphere, and the test
  hemisphere stays unseen in training whatever ``N`` (the midline column stays out of every
  input, as classification_sample keeps it out of every patch).

Splits: the test split is classification_sample's test split (every site of the left
hemisphere), unchanged. The training split is every site of the right hemisphere on the same
lattice: classification_sample's training and validation sites plus those it drops for touching
its validation band, since the evidence holds nothing back there (the probe's L2 penalty is
chosen by cross-validation over spatial folds of the training hemisphere, :mod:`.folds`). Cubes
overlap their neighbours, so the cubes next to a fold's boundary share voxels with the held-out
fold (more of them for ``N > 16``) unless ``--cv-buffer`` drops them from the fit (each item
carries its centre and the box of atlas voxels its cube shows for that). The test hemisphere is
never reached.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from dinov2.sample_data.classification import LOBES, PatchSite, PatchTaskParams, plan_patch_sites

from .errors import EvidenceError
from .folds import DEFAULT_BLOCK_MM, DEFAULT_BUFFER, DEFAULT_FOLDS, DEFAULT_GROUPING, attach_folds
from .tasks import SPLITS, TaskData, TaskSplit, world_mm
from .volumes import BACKGROUND, EvidenceVolumes, HemisphereFrame, band_rows, cut_window, hemisphere_frames

# classification_sample's defaults: the very sites of its brain-lobe dataset.
PATCH_PARAMS = PatchTaskParams()


def site_centre(site: PatchSite, params: PatchTaskParams = PATCH_PARAMS) -> tuple[int, int, int]:
    """Atlas voxel ``(x, y, z)`` whose lobe labels the site (the centre of its patch)."""
    return tuple(int(o) + params.patch_size // 2 for o in site.origin)  # type: ignore[return-value]


def cube_origin(frame: HemisphereFrame, centre: Sequence[int], size: int) -> tuple[int, int, int]:
    """Frame-space corner of the ``size^3`` cube centred on an atlas voxel.

    Args:
        frame: the site's hemisphere frame.
        centre: atlas voxel ``(x, y, z)``.
        size: cube side ``N``.

    Returns:
        ``(u, j, k)`` for :func:`~dinov2.eval.evidence.volumes.cut_window` on ``frame.cut(...)``.
    """
    before = size // 2
    u = frame.frame_index(centre[0])
    # A mirrored frame reverses x, so its first index is the cube's last atlas column.
    u0 = u - (size - 1 - before) if frame.mirrored else u - before
    return u0, int(centre[1]) - before, int(centre[2]) - before


def _band_off_grid(params: PatchTaskParams, affine: np.ndarray, depth: int) -> PatchTaskParams:
    """``params`` with the validation band moved above the grid by a whole number of strides.

    classification_sample aligns the z lattice of its sites to the band's lowest row, so moving
    the band by whole strides keeps every site where it was, and past the grid no site touches it.
    """
    low_row = band_rows(affine, params.val_band_mm)[0]
    strides = max(0, math.ceil((depth - low_row) / params.stride))
    step_mm = strides * params.stride * float(affine[2, 2])
    return replace(params, val_band_mm=tuple(float(v) + step_mm for v in params.val_band_mm))


def plan_evidence_sites(volumes: EvidenceVolumes, params: PatchTaskParams = PATCH_PARAMS) -> list[PatchSite]:
    """classification_sample's test sites, and every site of the training hemisphere on the same lattice.

    Args:
        volumes: atlas on its grid.
        params: site recipe.

    Returns:
        Sites with split ``training`` (training hemisphere, all of it) or ``test`` (the other
        hemisphere: exactly classification_sample's test sites), training first, each sorted by origin.
    """
    sites = plan_patch_sites(volumes.lobes, volumes.regions, volumes.affine, params)
    whole = _band_off_grid(params, volumes.affine, volumes.lobes.shape[2])
    training = [s for s in plan_patch_sites(volumes.lobes, volumes.regions, volumes.affine, whole)
                if s.hemisphere == params.train_hemisphere]
    return training + [s for s in sites if s.split == "test"]


def _split_inputs(image_frames: dict[str, np.ndarray], frames: dict[str, HemisphereFrame],
                  sites: list[PatchSite], size: int, params: PatchTaskParams) -> list[np.ndarray]:
    """``(size, size, size)`` cube of every site, cut from its hemisphere's frame (air elsewhere)."""
    return [cut_window(image_frames[s.hemisphere], cube_origin(frames[s.hemisphere], site_centre(s, params), size),
                       size, BACKGROUND) for s in sites]


def _centres_mm(sites: list[PatchSite], affine: np.ndarray, params: PatchTaskParams) -> torch.Tensor:
    """float64 ``(S, 3)`` world ``(x, y, z)`` of every site's labelled voxel."""
    return world_mm(affine, np.array([site_centre(s, params) for s in sites], dtype=np.float64).reshape(-1, 3))


def _input_boxes(sites: list[PatchSite], frames: dict[str, HemisphereFrame], shape: Sequence[int], size: int,
                 params: PatchTaskParams) -> torch.Tensor:
    """int64 ``(S, 2, 3)`` atlas voxels ``[lo, hi)`` of the real voxels in every site's ``size^3`` cube.

    Mirroring does not move the cube in the atlas: both hemispheres span ``[c - N//2, c - N//2 + N)``
    around the centre voxel ``c``, clipped to the site's hemisphere columns and to the grid.
    """
    boxes = []
    for s in sites:
        lo = np.array(site_centre(s, params)) - size // 2
        floor = np.array([frames[s.hemisphere].columns[0], 0, 0])
        ceiling = np.array([frames[s.hemisphere].columns[1], shape[1], shape[2]])
        boxes.append(np.stack([np.maximum(lo, floor), np.minimum(lo + size, ceiling)]))
    return torch.from_numpy(np.array(boxes, dtype=np.int64).reshape(-1, 2, 3))


def build_patch_task(volumes: EvidenceVolumes, params: PatchTaskParams = PATCH_PARAMS,
                     patch_size: int | None = None, folds: int = DEFAULT_FOLDS, grouping: str = DEFAULT_GROUPING,
                     block_mm: float = DEFAULT_BLOCK_MM, buffer: bool = DEFAULT_BUFFER) -> TaskData:
    """Cut every site's cube out of every template (left-hemisphere cubes mirrored).

    Args:
        volumes: atlas and templates on one grid.
        params: site recipe; training on all of ``params.train_hemisphere``, test on the other
            hemisphere (see :func:`plan_evidence_sites`).
        patch_size: cube side ``N`` fed to the network (default ``params.patch_size``; not smaller).
        folds, grouping, block_mm, buffer: cross-validation folds of the training split, how they
            are grouped, the block side and whether fits keep off the held-out fold's voxels (see
            :func:`~dinov2.eval.evidence.folds.attach_folds`).

    Returns:
        :class:`TaskData` whose splits hold ``(S, 1, N, N, N)`` cubes, ``(S,)`` labels, site
        centres and cube boxes, all sites of the first template, then all of the second;
        ``folds`` and ``fitted_on`` set.

    Raises:
        EvidenceError: ``patch_size`` is smaller than the sites' patches, or ``folds`` does not fit.
    """
    size = params.patch_size if patch_size is None else int(patch_size)
    if size < params.patch_size:
        raise EvidenceError(f"--patch-size {size} is smaller than the classification_sample patches "
                            f"({params.patch_size} voxels): pass at least --patch-size {params.patch_size}.")
    sites = plan_evidence_sites(volumes, params)
    frames = hemisphere_frames(volumes.affine, volumes.lobes.shape)
    splits = {}
    for split in SPLITS:
        chosen = [s for s in sites if s.split == split]
        cubes = []
        for name in params.templates:
            image_frames = {h: f.cut(volumes.templates[name]) for h, f in frames.items()}
            cubes += _split_inputs(image_frames, frames, chosen, size, params)
        labels = torch.tensor([LOBES.index(s.lobe) for s in chosen] * len(params.templates), dtype=torch.int64)
        inputs = torch.from_numpy(np.stack(cubes)).unsqueeze(1).float()
        # One site gives one item per template, at one centre and showing the same atlas voxels.
        repeat = len(params.templates)
        centres = _centres_mm(chosen, volumes.affine, params).repeat(repeat, 1)
        boxes = _input_boxes(chosen, frames, volumes.lobes.shape, size, params).repeat(repeat, 1, 1)
        splits[split] = TaskSplit(inputs, labels, centre_mm=centres, input_box=boxes)
    task = TaskData("patch", splits, _task_info(volumes, params, size, splits))
    return attach_folds(task, folds, grouping, block_mm, buffer)


def _task_info(volumes: EvidenceVolumes, params: PatchTaskParams, size: int, splits: dict[str, TaskSplit]) -> dict:
    voxel_mm = float(abs(volumes.affine[0, 0]))
    return {"input_voxels": size, "input_mm": size * voxel_mm, "site_patch_voxels": params.patch_size,
            "cube": f"{size}^3 voxels centred on the site centre; beyond the grid, on the midline and in the "
                    "other hemisphere: air (-1); left hemisphere mirrored",
            "recipe": params.as_dict(),
            "splits": "training: every site of the training hemisphere (classification_sample's validation band "
                      "not held back); test: classification_sample's test sites",
            "label": "Harvard-Oxford lobe at the patch centre (dinov2.data.classification_sample sites)",
            "examples": {s: int(splits[s].labels.numel()) for s in SPLITS},
            "class_counts": {s: splits[s].class_counts() for s in SPLITS}}
