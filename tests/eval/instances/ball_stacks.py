"""Generated stacks of touching balls, written as TIFF and NIfTI, for the model / train / segment tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pytest

# the tests that write stacks also segment them: TIFF and the watershed are the optional extra 'instances'
pytest.importorskip("skimage", reason="the watershed needs the optional extra 'instances'")
tifffile = pytest.importorskip("tifffile", reason="TIFF stacks need the optional extra 'instances'")


def touching_balls(shape: Sequence[int] = (24, 24, 16), spacing: Sequence[float] = (1.0, 1.0, 2.0), radius: float = 4.0,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(image float32, labels int32)``, both ``(X, Y, Z)``: balls of ``radius`` (physical units) on a
    jittered grid whose step is ``1.7 * radius``, so neighbours touch; each voxel belongs to the
    nearest centre within the radius. The image is the brightest ball profile ``1 - (d / r)^2`` at
    each voxel plus noise, so it dips where two balls meet."""
    rng = np.random.default_rng(seed)
    step = 1.7 * radius
    extent = [n * s for n, s in zip(shape, spacing)]
    axes = [np.arange(start, size - radius / 2, step) for start, size in zip([radius] * 3, extent)]
    centres = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    centres = centres + rng.uniform(-0.15 * radius, 0.15 * radius, centres.shape)
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), -1)
    dist = np.linalg.norm(grid[..., None, :] - centres, axis=-1)  # (X, Y, Z, n)
    nearest = dist.argmin(-1)
    inside = dist.min(-1) <= radius
    labels = np.where(inside, nearest + 1, 0).astype(np.int32)
    profile = np.clip(1.0 - (dist / radius) ** 2, 0.0, None).max(-1)
    image = (100.0 + 800.0 * profile + rng.normal(0.0, 20.0, shape)).astype(np.float32)
    return image, labels


def write_tiff(path: Path, array: np.ndarray, spacing: Sequence[float]) -> Path:
    """An ImageJ TIFF of ``(X, Y, Z)`` ``array`` stored as ``(Z, Y, X)`` planes with its spacing."""
    x, y, z = spacing
    tifffile.imwrite(path, np.ascontiguousarray(array.transpose(2, 1, 0)), imagej=True,
                     resolution=(1.0 / x, 1.0 / y), metadata={"axes": "ZYX", "spacing": z, "unit": "um"})
    return path


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """A NIfTI of ``(X, Y, Z)`` ``array`` with ``affine``."""
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def nifti_affine(spacing: Sequence[float]) -> np.ndarray:
    """A non-trivial affine (an axis flip and an offset) with the voxel size ``spacing``."""
    affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [10.0, -5.0, 3.0]
    return affine


def write_ball_datalist(folder: Path, shape: Sequence[int] = (24, 24, 16), spacing: Sequence[float] = (1.0, 1.0, 2.0)
                        ) -> Path:
    """Four stacks of touching balls (2 training TIFF, 1 validation NIfTI, 1 test TIFF) and their datalist.

    Returns:
        The datalist JSON (the segmentation layout; the NIfTI entry also states its spacing).
    """
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for seed in range(4):
        image, labels = touching_balls(shape, spacing, seed=seed)
        if seed == 2:
            write_nifti(folder / f"balls{seed}.nii.gz", image, nifti_affine(spacing))
            write_nifti(folder / f"balls{seed}_labels.nii.gz", labels.astype(np.uint16), nifti_affine(spacing))
            entries.append({"image": f"balls{seed}.nii.gz", "label": f"balls{seed}_labels.nii.gz",
                            "spacing": list(spacing)})
        else:
            write_tiff(folder / f"balls{seed}.tif", image, spacing)
            write_tiff(folder / f"balls{seed}_labels.tif", labels.astype(np.uint16), spacing)
            entries.append({"image": f"balls{seed}.tif", "label": f"balls{seed}_labels.tif"})
    datalist = folder / "balls.json"
    datalist.write_text(json.dumps({"training": [entries[0], entries[1]], "validation": [entries[2]],
                                    "test": [entries[3]]}, indent=1))
    return datalist
