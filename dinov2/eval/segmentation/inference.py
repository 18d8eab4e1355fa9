"""Sliding-window inference (Gaussian blending, optional flip test-time augmentation) and
prediction of label maps in each input's original space."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Invertd
from torch import nn

from dinov2.data.image_io import is_nifti_path, read_header
from dinov2.data.validation import CheckedVolume, InputVolumeError, check_same_grid, find_input_error, read_volume
from dinov2.eval.presets import region_decoding_table

from .data import eval_transforms

BLEND_MODES = ("gaussian", "constant")
FLIP_AXES: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (4,))  # identity, then each spatial axis


def predict_probabilities(model: nn.Module, image: torch.Tensor, roi_size: Sequence[int], multilabel: bool,
                          overlap: float = 0.5, blend: str = "gaussian", sw_batch_size: int = 4,
                          tta_flip: bool = False, autocast: contextlib.AbstractContextManager | None = None,
                          sw_device: torch.device | str | None = None) -> torch.Tensor:
    """Probabilities of a whole volume by sliding windows.

    Windows of ``roi_size`` overlap by ``overlap``; their logits are blended with Gaussian
    weights (centres count more than borders, which lack context), then turned into softmax or
    sigmoid probabilities. With ``tta_flip`` the volume is also predicted mirrored along each
    spatial axis and the four probability maps are averaged.

    Args:
        model: maps ``(b, C, *roi_size)`` to logits ``(b, K, *roi_size)``; called in eval mode.
        image: ``(B, C, H, W, D)`` (any size; padded internally where smaller than the window).
        roi_size: window size.
        multilabel: sigmoid per channel instead of softmax over channels.
        overlap: fraction of window overlap in ``[0, 1)``.
        blend: ``"gaussian"`` or ``"constant"``.
        sw_batch_size: windows per forward pass.
        tta_flip: average over flips along each axis.
        autocast: context for the forward passes (mixed precision), None for fp32.
        sw_device: device the windows run on (default: the image's).

    Returns:
        float32 probabilities ``(B, K, H, W, D)`` on the image's device.
    """
    if blend not in BLEND_MODES:
        raise ValueError(f"blend must be one of {BLEND_MODES}, got '{blend}' (evaluation.blend)")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap} (evaluation.overlap / --overlap)")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")

    def run(x: torch.Tensor) -> torch.Tensor:
        with autocast or contextlib.nullcontext():
            return model(x)

    was_training = model.training
    model.eval()
    total = None
    try:
        with torch.no_grad():
            for axes in FLIP_AXES if tta_flip else FLIP_AXES[:1]:
                x = torch.flip(image, axes) if axes else image
                logits = sliding_window_inference(x, list(roi_size), sw_batch_size, run, overlap=overlap, mode=blend,
                                                  sw_device=sw_device, device=image.device).float()
                probs = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)
                probs = torch.flip(probs, axes) if axes else probs
                total = probs if total is None else total + probs
    finally:
        model.train(was_training)
    n = len(FLIP_AXES) if tta_flip else 1
    return torch.as_tensor(total) / n


def labels_from_probabilities(probs: torch.Tensor, preset) -> torch.Tensor:
    """Label map from probabilities: argmax for classes; for regions, the preset's label values.

    Args:
        probs: ``(K, H, W, D)``.
        preset: :class:`~dinov2.eval.presets.DatasetPreset`.

    Returns:
        int64 ``(H, W, D)``: class indices, or (multi-label) the label value each on/off region
        combination stands for (BraTS: 1, 2, 4; see ``region_decoding_table``), painted in the
        preset's ``regions_class_order`` when it has one (nnU-Net's integer labels).
    """
    if not preset.multilabel:
        return probs.argmax(0)
    table = torch.as_tensor(region_decoding_table(preset.regions, getattr(preset, "regions_class_order", None)),
                            device=probs.device)
    weights = (2 ** torch.arange(probs.shape[0], device=probs.device)).view(-1, 1, 1, 1)
    return table[((probs > 0.5).long() * weights).sum(0)]


def check_case(image_paths: Sequence[str | os.PathLike], preset, frame: int | None = None,
               frame_flag: str | None = "--frame") -> list[CheckedVolume]:
    """Check the input files of one case before prediction (:func:`dinov2.data.validation.read_volume`).

    A case is one volume (a NIfTI file: 3D; or 4D with ``frame`` chosen; or 4D whose frames are the
    model's channels; or a DICOM series folder, ``FOLDER::SERIES``, or multi-frame DICOM file) or
    one 3D volume per modality, all on one grid.

    Raises:
        InputVolumeError: the first problem found, naming its file.
    """
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise ValueError("A case needs at least one image file.")
    channels = preset.in_channels
    if len(paths) == 1:
        return [read_volume(paths[0], frame=frame, channels=channels, frame_flag=frame_flag)]
    if len(paths) != channels:
        raise InputVolumeError(paths[0], f"the case gives {len(paths)} files but the model takes {channels} "
                               f"modalities {list(preset.modalities)}",
                               "list one file per modality, in that order, in the 'image' of a datalist JSON")
    volumes = [read_volume(p, channels=1, frame_flag=None) for p in paths]
    for volume in volumes[1:]:
        check_same_grid(volumes[0], volume, role="modality image", reference_role="first modality image")
    return volumes


def _save_atomically(image: nib.Nifti1Image, output_path: Path) -> None:
    """Write to a hidden temporary name in the same folder, then rename: a failed write leaves nothing."""
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(f".{output_path.name}.{os.getpid()}.partial.nii.gz")
    try:
        nib.save(image, tmp)
        os.replace(tmp, output_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def label_image(labels: np.ndarray, reference_path: str | os.PathLike) -> nib.Nifti1Image:
    """NIfTI of ``labels`` in the space of the input ``reference_path``.

    Args:
        labels: integer ``(X, Y, Z)`` on the input's voxel grid.
        reference_path: the (first) input: a NIfTI file lends its header (orientation codes, units);
            a DICOM input its RAS affine (scanner coordinates, as the header reader computes it).

    Returns:
        uint8 (int16 beyond 255 labels) NIfTI image with the input's shape and affine.
    """
    if is_nifti_path(reference_path):
        reference = nib.load(reference_path)
        shape, affine, header = tuple(reference.shape[:3]), reference.affine, reference.header.copy()
    else:
        volume = read_header(reference_path)
        shape, affine, header = volume.spatial_shape, volume.affine, None
        if affine is None:  # no orientation tags: the voxel size is all there is
            affine = np.diag([*volume.spacing[:3], 1.0])
    if labels.shape != shape:
        raise RuntimeError(f"Inverted prediction has shape {labels.shape} but {reference_path} has {shape}; please "
                           "report this with the input's header.")
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.int16
    out = nib.Nifti1Image(labels.astype(dtype), affine, header)
    out.header.set_data_dtype(dtype)
    out.header.set_slope_inter(1, 0)
    if header is None:  # DICOM patient coordinates are the scanner's
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
    return out


def predict_case(model: nn.Module, preset, image_paths: Sequence[str], output_path: str | os.PathLike,
                 overlap: float = 0.5, blend: str = "gaussian", sw_batch_size: int = 4, tta_flip: bool = False,
                 device: torch.device | str = "cpu",
                 autocast: contextlib.AbstractContextManager | None = None, frame: int | None = None) -> Path:
    """Segment one case and write its label map in the input's original space.

    The inputs are checked first (:func:`check_case`); the image goes through the preset's
    preprocessing (orientation, spacing, intensity, foreground crop); the probabilities are mapped
    back through the inverse of those spatial steps (MONAI ``Invertd``: un-crop, resample
    linearly, re-orient), then turned into labels, so the output has the shape and affine of the
    (first) input file, whatever its orientation. The label map is written under a temporary name
    and renamed, so a failed case leaves no output file.

    Args:
        model: finetuned model (eval mode).
        preset: its dataset preset.
        image_paths: one file per modality, in the preset's modality order (or one 4D file whose
            frames are the modalities).
        output_path: NIfTI file to write (``.nii.gz``).
        overlap, blend, sw_batch_size, tta_flip, autocast: see :func:`predict_probabilities`.
        device: where the model runs.
        frame: frame of a 4D input to segment (ignored for 3D inputs).

    Returns:
        The written path.

    Raises:
        InputVolumeError: an input that cannot be segmented (names the file, says why).
    """
    image_paths = [str(p) for p in image_paths]
    volumes = check_case(image_paths, preset, frame)
    pre = eval_transforms(preset, with_label=False, frame=volumes[0].frame)
    try:
        data = pre({"image": image_paths if len(image_paths) > 1 else image_paths[0]})
    except Exception as exc:  # MONAI wraps transform errors: surface ours, naming the file
        found = find_input_error(exc)
        if found is not None:
            raise found from exc
        raise
    image = data["image"]
    # Volume and blended output in host memory, windows on ``device`` (whole CT volumes with many
    # classes do not fit next to the model on a GPU).
    probs = predict_probabilities(model, image.unsqueeze(0), preset.roi_size, preset.multilabel,
                                  overlap=overlap, blend=blend, sw_batch_size=sw_batch_size, tta_flip=tta_flip,
                                  autocast=autocast, sw_device=device)[0]
    data["pred"] = MetaTensor(probs, meta=dict(image.meta),
                              applied_operations=list(image.applied_operations))
    inverted = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)(data)["pred"]
    labels = labels_from_probabilities(torch.as_tensor(inverted), preset).numpy()
    out = label_image(labels, image_paths[0])
    output_path = Path(output_path)
    _save_atomically(out, output_path)
    return output_path
