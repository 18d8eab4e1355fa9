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

from dinov2.data.dicom_series import volume_name, volume_source
from dinov2.data.transforms import build_preprocessing, resolve_preprocessing_config
from dinov2.data.validation import InputVolumeError, check_same_grid, find_input_error, read_volume


@dataclass
class VisVolume:
    """One 3D frame ready for the backbone.

    Attributes:
        path: source file, DICOM series folder or ``FOLDER::SERIES``.
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
        return volume_name(self.path) + (f"_frame{self.frame}" if self.frame is not None else "")


def load_vis_volume(path: str | os.PathLike, frame: int = 0, preprocessing: dict | None = None,
                    mask_path: str | os.PathLike | None = None) -> VisVolume:
    """Load one frame of a NIfTI file (or a DICOM series folder, ``FOLDER::SERIES``, a multi-frame
    DICOM file), scaled like the pretraining data.

    The file is checked first (:func:`dinov2.data.validation.read_volume`: empty, truncated or
    unreadable files, 2D/5D arrays, frame out of range, no finite voxel in the frame; some NaN/Inf
    voxels are tolerated with one warning). The whole file then goes through
    :func:`dinov2.data.transforms.build_preprocessing` with the foreground crop and axis
    reordering switched off (so the voxel grid stays the input's): non-finite repair (the
    smallest finite value), then robust intensity scaling to ``[-1, 1]`` over the whole series,
    as in pretraining; then frame ``frame`` is taken.

    Args:
        path: ``.nii`` / ``.nii.gz`` (3D or 4D) or a DICOM volume; outputs take its affine (RAS).
        frame: frame of a 4D series (ignored, with ``frame`` reported as None, for 3D input).
        preprocessing: ``preprocessing`` overrides (default: the packaged pretraining recipe).
        mask_path: optional foreground mask (non-zero = foreground) on the same grid; default:
            voxels above ``preprocessing.foreground.threshold`` of the scaled intensities.

    Returns:
        A :class:`VisVolume`.

    Raises:
        InputVolumeError: unreadable file, wrong dimensionality, frame out of range, no finite
            voxel, mask unreadable or on another grid (a ``ValueError``; names the file).
    """
    path = Path(path)
    if not volume_source(path).exists():
        raise InputVolumeError(path, "the image file does not exist",
                               "pass an existing NIfTI file or DICOM series folder with --image-path")
    checked = read_volume(path, frame=frame, channels=1, frame_flag="--frame")
    shape = checked.shape
    spacing = tuple(float(s) for s in checked.header.spacing[:3])
    # A DICOM without orientation tags has no affine: the voxel size is all there is (as the reader does).
    affine = np.asarray(checked.affine if checked.affine is not None else np.diag([*spacing, 1.0]), dtype=np.float64)
    n_frames = checked.frames
    overrides = dict(preprocessing or {})
    overrides["reorder_axes"] = False
    overrides["foreground"] = {**dict(overrides.get("foreground", {})), "enabled": False}
    resolved = resolve_preprocessing_config(overrides)
    try:
        record = build_preprocessing(resolved)({"image": str(path)})
    except Exception as exc:  # MONAI wraps transform errors: surface ours, naming the file
        found = find_input_error(exc)
        if found is not None:
            raise found from exc
        raise
    series = record["image"].float()  # (T, X, Y, Z)
    if tuple(series.shape[1:]) != shape[:3]:
        raise ValueError(f"{path}: the loader returned spatial shape {tuple(series.shape[1:])} but the header "
                         f"says {shape[:3]}; convert the file with a standard tool (e.g. nibabel) and retry.")
    index = frame if len(shape) == 4 else 0
    scaled = series[index].numpy().astype(np.float32)
    if mask_path is not None:
        mask = read_volume(mask_path, role="mask", frame_flag=None)
        check_same_grid(checked, mask, role="mask")
        mask_image = nib.load(mask_path)
        foreground = np.asarray(mask_image.dataobj).reshape(mask.spatial_shape) != 0
    else:
        foreground = scaled > float(resolved["foreground"]["threshold"])
    if not foreground.any():
        raise ValueError(f"{path}: no foreground voxel (mask empty or image blank); give --mask-path or check "
                         "the image.")
    return VisVolume(path, scaled, affine, spacing, frame if len(shape) == 4 else None, n_frames, foreground)


def to_tensor(volume: VisVolume) -> torch.Tensor:
    """``(1, 1, X, Y, Z)`` float32 tensor of the scaled intensities."""
    return torch.from_numpy(volume.scaled)[None, None]
