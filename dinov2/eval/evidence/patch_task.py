"""Patch task: a 16^3-voxel (32 mm) patch -> the lobe at its centre (classification_sample's sites)."""

from __future__ import annotations

import numpy as np
import torch

from dinov2.data.classification_sample import LOBES, PatchTaskParams, plan_patch_sites

from .tasks import SPLITS, TaskData, TaskSplit
from .volumes import EvidenceVolumes

# classification_sample's defaults: the very sites of its brain-lobe dataset.
PATCH_PARAMS = PatchTaskParams()


def build_patch_task(volumes: EvidenceVolumes, params: PatchTaskParams = PATCH_PARAMS) -> TaskData:
    """Cut every site's patch out of every template (left-hemisphere patches mirrored).

    Args:
        volumes: atlas and templates on one grid.
        params: site recipe; training on ``params.train_hemisphere`` outside the validation
            band, validation inside it, test on the other hemisphere.

    Returns:
        :class:`TaskData` whose splits hold ``(N, 1, p, p, p)`` patches and ``(N,)`` labels, all
        sites of the first template, then all of the second.
    """
    sites = plan_patch_sites(volumes.lobes, volumes.regions, volumes.affine, params)
    p = params.patch_size
    splits = {}
    for split in SPLITS:
        chosen = [s for s in sites if s.split == split]
        patches = []
        for name in params.templates:
            volume = volumes.templates[name]
            for site in chosen:
                i, j, k = site.origin
                patch = volume[i:i + p, j:j + p, k:k + p]
                patches.append(patch[::-1] if site.hemisphere == "left" else patch)
        labels = [LOBES.index(s.lobe) for s in chosen] * len(params.templates)
        inputs = torch.from_numpy(np.ascontiguousarray(np.stack(patches))).unsqueeze(1)
        splits[split] = TaskSplit(inputs.float(), torch.tensor(labels, dtype=torch.int64))
    info = {"input_voxels": p, "recipe": params.as_dict(),
            "label": "Harvard-Oxford lobe at the patch centre (dinov2.data.classification_sample sites)",
            "class_counts": {s: splits[s].class_counts() for s in SPLITS}}
    return TaskData("patch", splits, info)
