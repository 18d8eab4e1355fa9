"""Previews of label maps over their image: a PNG per prediction, an axial row per validation (TensorBoard)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.transforms import LoadImage
from PIL import Image

from dinov2.data.image_io import is_nifti_path
from dinov2.data.readers import image_readers
from dinov2.eval.presets import DatasetPreset

from ..visualisation.montage import axial_row, foreground_center, gray, label_montage, label_overlay, with_legend

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


def validation_preview(image: np.ndarray, reference: np.ndarray, prediction: np.ndarray, affine: np.ndarray,
                       names: dict[int, str] | None = None) -> Image.Image:
    """One axial slice of a case: the image, the reference labels over it, the predicted labels over it.

    The slice passes through the centre of the reference's labelled region (of the prediction's
    when the reference is empty), as :func:`write_preview`'s montage does.

    Args:
        image: ``(X, Y, Z)`` intensities (any range: shown by :func:`display_scaled`).
        reference: integer ``(X, Y, Z)`` label map (0 = background; negative values are not drawn).
        prediction: integer ``(X, Y, Z)`` label map on the same grid.
        affine: the grid's ``(4, 4)`` affine (orientation and pixel size).
        names: label value → legend name (default: the value).

    Returns:
        A Pillow RGB image: three panels side by side and the colour legend of the values drawn.
    """
    base = gray(display_scaled(image))
    reference = np.clip(reference, 0, None)
    ref_rgb, ref_legend = label_overlay(base, reference, names)
    pred_rgb, pred_legend = label_overlay(base, prediction, names)
    labelled = reference != 0 if reference.any() else prediction != 0
    row = axial_row([base, ref_rgb, pred_rgb], ["image", "reference", "prediction"], affine,
                    foreground_center(labelled))
    legend = sorted(set(ref_legend + pred_legend), key=lambda entry: int(entry[0].split()[0]))
    return with_legend(row, legend or [("no label found", (160, 160, 160))])
