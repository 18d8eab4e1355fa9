"""What the service computes, on top of the prediction code (nothing of it is copied here).

* :func:`segment_nifti`: :func:`~dinov2.eval.segmentation.inference.predict_case` (the code of
  ``python -m dinov2.eval.segmentation.predict``, so the label map is the one ``predict`` writes,
  in the input's space), plus the volume of every class in mL.
* :func:`embed_nifti`: the backbone's CLS and mean patch token over windows of the model's input
  size, after the same preprocessing.
* :func:`describe`: architecture, classes and preprocessing, for ``GET /v1/model``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

import dinov2
from dinov2.checkpoints.finetuned import load_finetuned
from dinov2.data.validation import find_input_error, read_volume
from dinov2.eval.segmentation.data import eval_transforms
from dinov2.eval.segmentation.inference import check_case, predict_case
from dinov2.utils.config import with_packaged_defaults
from dinov2.utils.device import resolve_device
from dinov2.utils.precision import autocast_context

PACKAGE = "dinov2-3d"
# How the messages of read_volume name the way to choose a frame of a 4D upload.
FRAME_FLAG = "the query parameter frame"


@dataclass
class ServedModel:
    """The one model a server holds.

    Attributes:
        model: the finetuned :class:`~dinov2.eval.segmentation.model.SegmentationModel` (eval mode).
        preset: its :class:`~dinov2.eval.presets.DatasetPreset`.
        info: the checkpoint without its weights (see :mod:`dinov2.checkpoints.finetuned`).
        device: where it runs.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast of the forward passes).
        settings: sliding-window settings of ``predict_case`` (overlap, blend, sw_batch_size, tta_flip).
        checkpoint: the file it was loaded from.
    """

    model: torch.nn.Module
    preset: Any
    info: dict
    device: torch.device
    precision: str
    settings: dict
    checkpoint: Path

    def autocast(self):
        """A fresh autocast context for one request (contexts are not shared between threads)."""
        return autocast_context(self.precision, self.device)


def load_served_model(checkpoint: str | os.PathLike, device: str = "auto", precision: str = "fp32",
                      tta_flip: bool = False) -> ServedModel:
    """Load ``best_model.pth`` once, with the checkpoint's own sliding-window settings (as ``predict``).

    Raises:
        FileNotFoundError, CheckpointError, ValueError: see :func:`~dinov2.checkpoints.finetuned.load_finetuned`.
        UsageError: an unusable ``device``.
    """
    where = resolve_device(device, key="--device")
    model, preset, info = load_finetuned(checkpoint, where)
    evaluation = with_packaged_defaults("evaluation", info["config"].get("evaluation", {}),
                                        default="eval/segmentation_default")
    settings = {"overlap": float(evaluation["overlap"]), "blend": str(evaluation["blend"]),
                "sw_batch_size": int(evaluation["sw_batch_size"]), "tta_flip": tta_flip}
    return ServedModel(model, preset, info, where, precision, settings, Path(checkpoint))


def segment_nifti(served: ServedModel, image: Path, output: Path, frame: int | None = None) -> dict[str, float]:
    """Write the label map of ``image`` to ``output`` (shape and affine of ``image``) and measure it.

    Args:
        served: the model.
        image: a NIfTI file: 3D, 4D with ``frame``, or 4D whose frames are the model's channels.
        output: the ``.nii.gz`` to write.
        frame: frame of a 4D image.

    Returns:
        ``{class or region name: volume in mL}`` (see :func:`class_volumes_ml`).

    Raises:
        InputVolumeError: an image that cannot be segmented (says why).
    """
    # Header first, so a 4D upload is told about the query parameter (predict_case names --frame).
    read_volume(image, frame=frame, channels=served.preset.in_channels, frame_flag=FRAME_FLAG, read_voxels=False)
    predict_case(served.model, served.preset, [image], output, device=served.device,
                 autocast=served.autocast(), frame=frame, **served.settings)
    written = nib.load(output)
    return class_volumes_ml(np.asanyarray(written.dataobj), written.affine, served.preset)


def class_volumes_ml(labels: np.ndarray, affine: np.ndarray, preset) -> dict[str, float]:
    """Volume of every foreground class (or region) of a label map, in mL.

    Args:
        labels: integer ``(X, Y, Z)`` label map (class indices; for regions, the preset's label values).
        affine: its ``(4, 4)`` voxel-to-world matrix (mm); one voxel is ``|det(affine[:3, :3])|`` mm³.
        preset: the model's dataset preset.

    Returns:
        ``{name: mL}`` for classes 1..K-1 (multi-class) or every region (the voxels whose label is one
        of the region's values), 0.0 when absent; rounded to 1e-6 mL.
    """
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=1)

    def volume(values) -> float:
        return round(float(sum(counts[v] for v in values if v < len(counts))) * voxel_ml, 6)

    if preset.multilabel:
        return {name: volume(values) for name, values in preset.regions.items()}
    return {name: volume([index]) for index, name in enumerate(preset.classes) if index > 0}


def embed_nifti(served: ServedModel, image: Path, frame: int | None = None) -> dict[str, Any]:
    """Backbone features of ``image``: its CLS token and its mean patch token.

    The image gets the segmentation preprocessing (orientation, spacing, intensity, foreground
    crop), is padded with zeros to whole windows of the model's input size (``image_size``) and cut
    into them; each window goes through the backbone alone (``M`` streams when the backbone takes one
    modality at a time), and both features are averaged over the windows.

    Returns:
        ``{"cls": (M, E), "patch_mean": (M, E), "streams": M names, "embed_dim": E, "windows": n,
        "window_size": 3 ints, "preprocessed_shape": 3 ints}`` (nested lists of floats).

    Raises:
        InputVolumeError: an image that cannot be used (says why).
    """
    volume = torch.as_tensor(_preprocessed(served, image, frame)).float()
    windows = tile_windows(volume, served.preset.roi_size)
    streams = getattr(served.model, "num_modalities", 1)
    backbone = served.model.backbone
    cls_sum, patch_sum = 0.0, 0.0
    with torch.no_grad():
        for batch in windows.split(max(1, served.settings["sw_batch_size"])):
            x = batch.reshape(-1, batch.shape[1] // streams, *batch.shape[2:]).to(served.device)
            with served.autocast():
                out = backbone.forward_features(x)
            cls_sum = cls_sum + out["x_norm_clstoken"].float().reshape(-1, streams, backbone.embed_dim).sum(0)
            patches = out["x_norm_patchtokens"].float().mean(1)
            patch_sum = patch_sum + patches.reshape(-1, streams, backbone.embed_dim).sum(0)
    n = windows.shape[0]
    names = list(served.preset.modalities) if streams > 1 else ["+".join(served.preset.modalities)]
    return {"cls": (cls_sum / n).cpu().tolist(), "patch_mean": (patch_sum / n).cpu().tolist(), "streams": names,
            "embed_dim": int(backbone.embed_dim), "windows": int(n), "window_size": list(served.preset.roi_size),
            "preprocessed_shape": list(volume.shape[1:])}


def _preprocessed(served: ServedModel, image: Path, frame: int | None) -> torch.Tensor:
    """``(C, H, W, D)`` image after the preset's evaluation preprocessing (input checked first)."""
    checked = check_case([image], served.preset, frame, frame_flag=FRAME_FLAG)
    pre = eval_transforms(served.preset, with_label=False, frame=checked[0].frame)
    try:
        return pre({"image": os.fspath(image)})["image"]
    except Exception as exc:  # MONAI wraps transform errors: surface ours, naming the file
        found = find_input_error(exc)
        if found is not None:
            raise found from exc
        raise


def tile_windows(volume: torch.Tensor, size) -> torch.Tensor:
    """Cut ``(C, H, W, D)`` into non-overlapping windows ``(n, C, *size)`` (zero-padded at the far ends)."""
    pads = [(-s) % w for s, w in zip(volume.shape[1:], size)]
    padded = torch.nn.functional.pad(volume, [p for pad in reversed(pads) for p in (0, pad)])
    c = padded.shape[0]
    a, b, d = (s // w for s, w in zip(padded.shape[1:], size))
    tiles = padded.reshape(c, a, size[0], b, size[1], d, size[2]).permute(1, 3, 5, 0, 2, 4, 6)
    return tiles.reshape(a * b * d, c, *size)


def describe(served: ServedModel) -> dict[str, Any]:
    """What ``GET /v1/model`` answers: package, architecture, classes, preprocessing, inference."""
    preset, backbone, spec = served.preset, served.model.backbone, served.info.get("backbone") or {}
    task = ({"task": "multilabel", "regions": {k: list(v) for k, v in preset.regions.items()}} if preset.multilabel
            else {"task": "multiclass", "classes": list(preset.classes)})
    return {
        "package": PACKAGE, "version": dinov2.__version__, "checkpoint": served.checkpoint.name,
        "head": served.info.get("head"), "iteration": served.info.get("iteration"),
        "metric": served.info.get("metric"), "dataset": preset.name,
        "architecture": {"arch": spec.get("arch"), "embed_dim": int(backbone.embed_dim), "depth": int(backbone.depth),
                         "patch_size": int(backbone.patch_size), "in_chans": int(backbone.in_chans),
                         "kwargs": spec.get("kwargs") or {}},
        "modalities": list(preset.modalities), **task,
        "preprocessing": {"orientation": preset.orientation, "spacing_mm": list(preset.spacing),
                          "intensity": dict(preset.intensity), "crop_foreground": preset.crop_foreground,
                          "window_size": list(preset.roi_size)},
        "inference": {**served.settings, "precision": served.precision, "device": str(served.device)},
    }
