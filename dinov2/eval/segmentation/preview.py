"""PNG preview of a predicted label map over its input, for a quick look without a viewer."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.transforms import LoadImage

from dinov2.data.image_io import is_nifti_path
from dinov2.data.readers import image_readers
from dinov2.eval.presets import DatasetPreset

from ..visualisation.montage import label_montage

# Display window of the anatomy: robust to a few very bright or dark voxels.
DISPLAY_PERCENTILES = (0.5, 99.5)


def display_scaled(volume: np.ndarray) -> np.ndarray:
    """``volume`` mapped to ``[-1, 1]`` between its 0.5th and 99.5th percentiles (shape kept)."""
    finite = volume[np.isfinite(volume)]
    if finite.size == 0:
        return np.zeros(volume.shape, dtype=np.float32)
    low, high = np.percentile(finite, DISPLAY_PERCENTILES)
    scaled = (np.nan_to_num(volume, nan=low) - low) / max(float(high - low), 1e-6)
    return (np.clip(scaled, 0, 1) * 2 - 1).astype(np.float32)


def label_names(preset: DatasetPreset) -> dict[int, str]:
    """Label value → name: class names for softmax tasks; the preset's label values for regions."""
    if not preset.multilabel:
        return {i: name for i, name in enumerate(preset.classes)}
    return {}  # region tasks write label values (e.g. BraTS 1, 2, 4); the legend shows the values


def _input_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(voxels, affine)`` of the input: float32 ``(X, Y, Z[, T])`` and its ``(4, 4)`` affine."""
    if is_nifti_path(path):
        image = nib.load(str(path))
        return np.asarray(image.dataobj, dtype=np.float32), image.affine
    # DICOM (series folder, FOLDER::SERIES, multi-frame): read as the prediction read it.
    image = LoadImage(reader=image_readers(), image_only=True, dtype=np.float32)(str(path))
    return image.numpy(), image.affine.numpy()


def write_preview(image_path: str | os.PathLike, label_path: str | os.PathLike, png_path: str | os.PathLike,
                  preset: DatasetPreset, frame: int | None = None) -> Path:
    """Write axial/coronal/sagittal slices of the input with the predicted labels over it.

    Args:
        image_path: the (first-modality) input the prediction was made from (NIfTI or DICOM).
        label_path: the predicted label map, on the same grid (as ``predict_case`` writes it).
        png_path: PNG file to write.
        preset: the dataset preset (class names for the legend).
        frame: the frame of a 4D input that was segmented (default: the first).

    Returns:
        The written path.
    """
    anatomy, affine = _input_volume(image_path)
    labels = nib.load(str(label_path))
    if anatomy.ndim == 4:  # the segmented frame (frames used as channels: the first)
        anatomy = anatomy[..., frame if frame is not None and 0 <= frame < anatomy.shape[3] else 0]
    label_data = np.asarray(labels.dataobj).astype(np.int64)
    if anatomy.shape != label_data.shape:
        raise ValueError(f"{label_path} has shape {label_data.shape} but {image_path} has {anatomy.shape}: a preview "
                         "needs the label map on the input's grid, as dinov2.eval.segmentation.predict writes it.")
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    label_montage(display_scaled(anatomy), label_data, affine, label_names(preset)).save(png_path)
    return png_path
