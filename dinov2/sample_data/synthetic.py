"""Synthetic pretraining volumes, for machines without the sample-data packages.

The GPU check (``scripts/gpu_check.sh``) and the CUDA tests run on machines where only the
toolkit's own dependencies are installed, not the packages that ship real brain volumes
(:mod:`.pretraining`). What they measure (throughput, memory, the training loop's plumbing)
needs volumes of a realistic size and intensity layout, not anatomy: smooth random texture
inside an ellipsoidal "head" on a zero background, so the foreground crop of the preprocessing
has something to find. Nothing here is meant to be learned from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from dinov2.data.datalist import header_entry, write_datalist
from dinov2.data.image_io import read_header

# The 1 mm MNI152 grid: the size of a typical preprocessed head MRI.
MNI_1MM_SHAPE = (182, 218, 182)


def synthetic_volume(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """One ``(X, Y, Z)`` float32 volume: smooth texture in ``[100, 1100]`` inside an ellipsoid, 0 outside.

    The texture is white noise on a grid 8x coarser, trilinearly upsampled: cheap at any size
    (a Gaussian filter of a 7-million-voxel volume takes seconds) and smooth enough that crops
    and their augmentations do real interpolation work.

    Args:
        shape: ``(X, Y, Z)``, every side >= 8.
        seed: the texture's seed.

    Returns:
        float32 array of ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"synthetic_volume needs an (X, Y, Z) shape with every side >= 8, got {shape}")
    rng = np.random.default_rng(seed)
    coarse = rng.random(tuple(max(2, s // 8) for s in shape), dtype=np.float32)
    texture = ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)], order=1, grid_mode=True,
                           mode="nearest")[: shape[0], : shape[1], : shape[2]]
    axes = np.ogrid[tuple(slice(0, s) for s in shape)]
    # An ellipsoid filling 80 % of each side: the preprocessing's foreground crop removes the rim.
    radius = sum(((a - (s - 1) / 2) / (0.4 * s)) ** 2 for a, s in zip(axes, shape))
    return np.where(radius <= 1.0, 100.0 + 1000.0 * texture, 0.0).astype(np.float32)


def write_synthetic_datalist(folder: str | os.PathLike, count: int = 4, shape: Sequence[int] = MNI_1MM_SHAPE,
                             seed: int = 0) -> Path:
    """Write ``count`` synthetic volumes (uncompressed NIfTI, 1 mm isotropic) and their pretraining datalist.

    Args:
        folder: where ``synthetic_<i>.nii`` and ``pretrain.json`` go (created).
        count: volumes, each with its own seed ``seed + i``.
        shape: ``(X, Y, Z)`` of every volume.
        seed: seed of the first volume.

    Returns:
        Path of the datalist JSON (absolute image paths, shapes, spacings).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(count):
        # Uncompressed: gzip of a 7-million-voxel float volume costs more than the rest together.
        path = folder / f"synthetic_{i}.nii"
        nib.save(nib.Nifti1Image(synthetic_volume(shape, seed + i), np.eye(4)), path)
        entries.append(header_entry(read_header(path)))
    return write_datalist(entries, folder / "pretrain.json")
