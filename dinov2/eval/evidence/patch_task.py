"""Patch task: the ``N^3``-voxel cube around each classification_sample site -> the lobe at its centre.

Sites, labels and splits are those of :mod:`dinov2.data.classification_sample` (16^3-voxel =
32 mm patches on the 2 mm atlas grid, labelled by the lobe at the patch centre). The network is
fed the cube of ``patch_size`` (``N``) voxels centred on the same labelled voxel, so ``N = 16``
gives exactly classification_sample's patches and a larger ``N`` adds context around the same
label (with only 32 mm, a linear probe on anything saturates near the same accuracy):

* along each atlas axis the cube spans ``[c - N//2, c - N//2 + N)`` around the centre voxel
  ``c`` (the 16-voxel patch sits in its middle); left-hemisphere cubes are then mirrored along x,
  as the patches are, which puts the centre at index ``N - 1 - N//2`` instead of ``N//2``;
* voxels beyond the atlas grid are air (:data:`~dinov2.eval.evidence.volumes.BACKGROUND`);
* the cube is cut from the site's hemisphere frame, so the midline column and every voxel of the
  other hemisphere are air too: no input ever shows the other hemisphere, and the test
  hemisphere stays unseen in training whatever ``N`` (the midline column stays out of every
  input, as classification_sample keeps it out of every patch).

For ``N > 16`` the splits are no longer disjoint in voxels within the training hemisphere:
classification_sample keeps training patches off the validation band, but a training cube
reaches ``(N - 16) / 2`` voxels further and may overlap voxels that validation cubes show. Only
the probe's choice of L2 penalty looks at validation, so this can only make that choice a
little optimistic; the test hemisphere is never reached.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from dinov2.data.classification_sample import LOBES, PatchSite, PatchTaskParams, plan_patch_sites

from .errors import EvidenceError
from .tasks import SPLITS, TaskData, TaskSplit
from .volumes import BACKGROUND, EvidenceVolumes, HemisphereFrame, cut_window, hemisphere_frames

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


def _split_inputs(image_frames: dict[str, np.ndarray], frames: dict[str, HemisphereFrame],
                  sites: list[PatchSite], size: int, params: PatchTaskParams) -> list[np.ndarray]:
    """``(size, size, size)`` cube of every site, cut from its hemisphere's frame (air elsewhere)."""
    return [cut_window(image_frames[s.hemisphere], cube_origin(frames[s.hemisphere], site_centre(s, params), size),
                       size, BACKGROUND) for s in sites]


def build_patch_task(volumes: EvidenceVolumes, params: PatchTaskParams = PATCH_PARAMS,
                     patch_size: int | None = None) -> TaskData:
    """Cut every site's cube out of every template (left-hemisphere cubes mirrored).

    Args:
        volumes: atlas and templates on one grid.
        params: site recipe; training on ``params.train_hemisphere`` outside the validation
            band, validation inside it, test on the other hemisphere.
        patch_size: cube side ``N`` fed to the network (default ``params.patch_size``; not smaller).

    Returns:
        :class:`TaskData` whose splits hold ``(S, 1, N, N, N)`` cubes and ``(S,)`` labels, all
        sites of the first template, then all of the second.

    Raises:
        EvidenceError: ``patch_size`` is smaller than the sites' patches.
    """
    size = params.patch_size if patch_size is None else int(patch_size)
    if size < params.patch_size:
        raise EvidenceError(f"--patch-size {size} is smaller than the classification_sample patches "
                            f"({params.patch_size} voxels): pass at least --patch-size {params.patch_size}.")
    sites = plan_patch_sites(volumes.lobes, volumes.regions, volumes.affine, params)
    frames = hemisphere_frames(volumes.affine, volumes.lobes.shape)
    splits = {}
    for split in SPLITS:
        chosen = [s for s in sites if s.split == split]
        cubes = []
        for name in params.templates:
            image_frames = {h: f.cut(volumes.templates[name]) for h, f in frames.items()}
            cubes += _split_inputs(image_frames, frames, chosen, size, params)
        labels = [LOBES.index(s.lobe) for s in chosen] * len(params.templates)
        inputs = torch.from_numpy(np.stack(cubes)).unsqueeze(1)
        splits[split] = TaskSplit(inputs.float(), torch.tensor(labels, dtype=torch.int64))
    return TaskData("patch", splits, _task_info(volumes, params, size, splits))


def _task_info(volumes: EvidenceVolumes, params: PatchTaskParams, size: int, splits: dict[str, TaskSplit]) -> dict:
    voxel_mm = float(abs(volumes.affine[0, 0]))
    return {"input_voxels": size, "input_mm": size * voxel_mm, "site_patch_voxels": params.patch_size,
            "cube": f"{size}^3 voxels centred on the site centre; beyond the grid, on the midline and in the "
                    "other hemisphere: air (-1); left hemisphere mirrored",
            "recipe": params.as_dict(),
            "label": "Harvard-Oxford lobe at the patch centre (dinov2.data.classification_sample sites)",
            "class_counts": {s: splits[s].class_counts() for s in SPLITS}}
