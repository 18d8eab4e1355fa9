"""Read a volume for visualisation: one frame, pretraining intensities, a foreground mask.

The geometry of the input is never changed here (no crop, no reorientation), so every map made
from it can be written back with the input's own shape and affine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from dinov2.data.transforms import build_preprocessing, resolve_preprocessing_config


@dataclass
class VisVolume:
    """One 3D frame ready for the backbone.

    Attributes:
        path: source file.
        scaled: float32 ``(X, Y, Z)`` intensities in ``[-1, 1]`` (pretraining recipe).
        affine: ``(4, 4)`` voxel-to-world matrix of the input.
        spacing: voxel size per axis (mm).
        frame: frame index taken from a 4D series, None for a 3D input.
        n_frames: frames in the file (1 for 3D).
        foreground: bool ``(X, Y, Z)``: voxels above the pretraining foreground threshold, or the
            given mask.
    """

    path: Path
    scaled: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    frame: int | None
    n_frames: int
    foreground: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.scaled.shape)  # type: ignore[return-value]

    @property
    def stem(self) -> str:
        name = self.path.name
        for suffix in (".nii.gz", ".nii"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        return name + (f"_frame{self.frame}" if self.frame is not None else "")


def _spatial_header(path: Path) -> tuple[tuple[int, ...], np.ndarray, tuple[float, float, float]]:
    try:
        image = nib.load(path)
    except Exception as exc:  # nibabel raises many kinds for unreadable files
        raise ValueError(f"{path}: not a readable NIfTI image ({type(exc).__name__}: {exc}). "
                         "Give a .nii or .nii.gz volume.") from exc
    shape = tuple(int(s) for s in image.shape)
    # Trailing singleton axes (e.g. (X, Y, Z, 1, 1)) carry no frames.
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (3, 4):
        raise ValueError(f"{path}: shape {tuple(image.shape)}; visualisation needs a 3D volume or a 4D series.")
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return shape, np.asarray(image.affine, dtype=np.float64), zooms  # type: ignore[return-value]


def load_vis_volume(path: str | os.PathLike, frame: int = 0, preprocessing: dict | None = None,
                    mask_path: str | os.PathLike | None = None) -> VisVolume:
    """Load one frame of a NIfTI file, scaled like the pretraining data.

    The whole file goes through :func:`dinov2.data.transforms.build_preprocessing` with the
    foreground crop and axis reordering switched off (so the voxel grid stays the input's):
    non-finite repair, then robust intensity scaling to ``[-1, 1]`` over the whole series, as in
    pretraining; then frame ``frame`` is taken.

    Args:
        path: ``.nii`` / ``.nii.gz``, 3D or 4D.
        frame: frame of a 4D series (ignored, with ``frame`` reported as None, for 3D input).
        preprocessing: ``preprocessing`` overrides (default: the packaged pretraining recipe).
        mask_path: optional foreground mask (non-zero = foreground) on the same grid; default:
            voxels above ``preprocessing.foreground.threshold`` of the scaled intensities.

    Returns:
        A :class:`VisVolume`.

    Raises:
        ValueError: unreadable file, wrong dimensionality, frame out of range, mask on another grid.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Image not found: {path}. Pass an existing NIfTI file with --image-path.")
    shape, affine, spacing = _spatial_header(path)
    n_frames = shape[3] if len(shape) == 4 else 1
    if len(shape) == 4 and not 0 <= frame < n_frames:
        raise ValueError(f"{path} has {n_frames} frames (0..{n_frames - 1}); --frame {frame} is out of range.")
    overrides = dict(preprocessing or {})
    overrides["reorder_axes"] = False
    overrides["foreground"] = {**dict(overrides.get("foreground", {})), "enabled": False}
    resolved = resolve_preprocessing_config(overrides)
    record = build_preprocessing(resolved)({"image": str(path)})
    series = record["image"].float()  # (T, X, Y, Z)
    if tuple(series.shape[1:]) != shape[:3]:
        raise ValueError(f"{path}: the loader returned spatial shape {tuple(series.shape[1:])} but the header "
                         f"says {shape[:3]}; convert the file with a standard tool (e.g. nibabel) and retry.")
    index = frame if len(shape) == 4 else 0
    scaled = series[index].numpy().astype(np.float32)
    if mask_path is not None:
        mask_image = nib.load(mask_path)
        if tuple(mask_image.shape[:3]) != shape[:3] or not np.allclose(mask_image.affine, affine, atol=1e-3):
            raise ValueError(f"Mask {mask_path} (shape {mask_image.shape}) is not on the grid of {path} "
                             f"(shape {shape[:3]}); resample it onto the image first.")
        foreground = np.asarray(mask_image.dataobj).reshape(mask_image.shape[:3]) != 0
    else:
        foreground = scaled > float(resolved["foreground"]["threshold"])
    if not foreground.any():
        raise ValueError(f"{path}: no foreground voxel (mask empty or image blank); give --mask-path or check "
                         "the image.")
    return VisVolume(path, scaled, affine, spacing, frame if len(shape) == 4 else None, n_frames, foreground)


def to_tensor(volume: VisVolume) -> torch.Tensor:
    """``(1, 1, X, Y, Z)`` float32 tensor of the scaled intensities."""
    return torch.from_numpy(volume.scaled)[None, None]
