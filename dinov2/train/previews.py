"""TensorBoard images of a pretraining run: what the teacher sees in one fixed volume.

At every teacher export (``evaluation.eval_period_iterations`` and the end), with
``train.tensorboard``, rank 0 writes two images of the first volume of the datalist
(preprocessed like training, read from the run's cache):

* ``teacher/pca``: its axial slice, then principal components 1-3 of the last block's patch
  tokens as RGB (fitted on the foreground tokens, as ``python -m dinov2.eval.visualisation
  --vis-type pca`` does);
* ``teacher/attention``: its axial slice, then each head's CLS-to-patch attention of the last
  block over it.

The volume is shrunk once, by one factor on every axis, so its longest side is the global crop
size: one small forward per export, on the CPU, in a copy of the teacher's backbone. A failure
is a warning: these images never stop a run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image

from dinov2.eval.visualisation.attention import display_scale
from dinov2.eval.visualisation.montage import axial_row, foreground_center, gray, heat_overlay
from dinov2.eval.visualisation.pca import fit_pca, scale_scores
from dinov2.eval.visualisation.tokens import TokenMaps, compute_token_maps, to_voxels, token_fraction
from dinov2.train.ssl_meta_arch import backbone_from_config
from dinov2.utils.tensorboard import TensorBoard

logger = logging.getLogger(__name__)

RGB_COMPONENTS = (1, 2, 3)  # as python -m dinov2.eval.visualisation shows them by default
TOKEN_FOREGROUND_FRACTION = 0.5  # a token is foreground when half of its patch is
DISPLAY_PX = 192  # longest side of a panel in pixels


@dataclass(frozen=True)
class PreviewVolume:
    """The fixed volume, shrunk for a cheap forward.

    Attributes:
        image: ``(1, 1, X, Y, Z)`` float32 intensities as in training (``[-1, 1]`` by default).
        foreground: bool ``(X, Y, Z)``: voxels above ``preprocessing.foreground.threshold``.
        spacing: display voxel size per axis (the file's proportions, the longest side
            :data:`DISPLAY_PX` "mm", i.e. pixels).
    """

    image: torch.Tensor
    foreground: torch.Tensor
    spacing: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        """``(4, 4)`` display affine: axes as stored (the through-plane axis last after preprocessing)."""
        return np.diag([*self.spacing, 1.0])


def preview_volume(record: Mapping[str, Any], longest_side: int, threshold: float) -> PreviewVolume:
    """Shrink a preprocessed record so its longest side is ``longest_side`` voxels (one factor for all axes).

    Args:
        record: ``{"image": (T, X, Y, Z), "spacing": 3 floats}`` (a pretraining dataset record);
            frame 0 is used.
        longest_side: e.g. ``crops.global_crops_size``.
        threshold: foreground threshold on the scaled intensities.

    Returns:
        A :class:`PreviewVolume` of shape ``(1, 1, X', Y', Z')``, ``max(X', Y', Z') = longest_side``.
    """
    volume = torch.as_tensor(record["image"])[:1].float()
    factor = longest_side / max(volume.shape[1:])
    size = [max(1, round(s * factor)) for s in volume.shape[1:]]
    image = F.interpolate(volume[None], size=size, mode="trilinear", align_corners=False)
    physical = [float(sp) * s / n for sp, s, n in zip(record["spacing"], volume.shape[1:], size)]
    scale = DISPLAY_PX / max(p * n for p, n in zip(physical, size))
    return PreviewVolume(image, image[0, 0] > threshold, tuple(p * scale for p in physical))  # type: ignore[arg-type]


def pca_rgb(maps: TokenMaps, foreground: torch.Tensor) -> np.ndarray:
    """Components :data:`RGB_COMPONENTS` of the patch tokens as RGB voxels, black outside the foreground.

    Args:
        maps: token maps with ``features`` ``(E, h, w, d)``.
        foreground: bool ``(X, Y, Z)`` of the input.

    Returns:
        ``uint8`` ``(X, Y, Z, 3)``.

    Raises:
        ValueError: too few foreground tokens for the components.
    """
    tokens = maps.features.flatten(1).T
    fg = token_fraction(foreground, maps.geometry).flatten() >= TOKEN_FOREGROUND_FRACTION
    pca = fit_pca(tokens[fg], max(RGB_COMPONENTS) + 1)
    scaled, _, _ = scale_scores(pca.transform(tokens)[:, list(RGB_COMPONENTS)], fg)
    voxels = to_voxels(scaled.T.reshape(len(RGB_COMPONENTS), *maps.geometry.grid), maps.geometry)
    rgb = (voxels.permute(1, 2, 3, 0).numpy() * 255).round().astype(np.uint8)
    return rgb * foreground.numpy()[..., None]


def teacher_images(backbone: torch.nn.Module, volume: PreviewVolume) -> dict[str, Image.Image]:
    """``{"pca": ..., "attention": ...}`` axial-slice rows of ``volume`` (one call of the token maps).

    Args:
        backbone: a :class:`dinov2.models.VisionTransformer3D` in eval mode.
        volume: from :func:`preview_volume`.
    """
    maps = compute_token_maps(backbone, volume.image, volume.spacing, "full_image", features=True, attention=True)
    base = gray(volume.image[0, 0].numpy())
    center = foreground_center(volume.foreground.numpy())
    attention = display_scale(to_voxels(maps.attention, maps.geometry, mode="nearest"), volume.foreground).numpy()
    heads = [heat_overlay(base, m) for m in attention]
    components = "/".join(str(c) for c in RGB_COMPONENTS)
    return {
        "pca": axial_row([base, pca_rgb(maps, volume.foreground)], ["anatomy", f"PCA {components}"],
                         volume.affine, center),
        "attention": axial_row([base, *heads], ["anatomy", *(f"head {h}" for h in range(len(heads)))],
                               volume.affine, center),
    }


class TeacherPreviews:
    """Writes :func:`teacher_images` of the datalist's first volume to TensorBoard at each export (rank 0).

    Args:
        tensorboard: the run's writer (nothing happens when it is not active).
        dataset: the pretraining dataset of all entries (``record(0)``: the first, preprocessed).
        cfg: the run's config (the backbone, ``crops.global_crops_size``, the foreground threshold).
    """

    def __init__(self, tensorboard: TensorBoard, dataset: Any, cfg: DictConfig) -> None:
        self._tb = tensorboard
        self._dataset = dataset
        self._cfg = cfg
        self._volume: PreviewVolume | None = None
        self._backbone: torch.nn.Module | None = None

    def write(self, teacher: Mapping[str, torch.Tensor], step: int) -> None:
        """Write the images of ``teacher`` (:meth:`SSLMetaArch.teacher_state_dict`, its ``backbone.*`` is used)
        at ``step``; a failure is a warning."""
        if not self._tb.active:
            return
        try:
            backbone = self._load(teacher)
            for name, image in teacher_images(backbone, self._fixed_volume()).items():
                self._tb.image(f"teacher/{name}", image, step)
            self._tb.flush()
        except Exception as exc:  # noqa: BLE001 - a picture must never stop a pretraining run
            logger.warning("No TensorBoard images of the teacher at step %d (%s: %s); training continues.",
                           step, type(exc).__name__, exc)

    def _fixed_volume(self) -> PreviewVolume:
        if self._volume is None:
            self._volume = preview_volume(self._dataset.record(0), int(self._cfg.crops.global_crops_size),
                                          float(self._cfg.preprocessing.foreground.threshold))
        return self._volume

    def _load(self, teacher: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        """The CPU copy of the teacher's backbone (built once), with ``teacher``'s weights."""
        if self._backbone is None:
            self._backbone = backbone_from_config(self._cfg, teacher=True).eval()
        prefix = "backbone."
        self._backbone.load_state_dict({k[len(prefix):]: v for k, v in teacher.items() if k.startswith(prefix)})
        return self._backbone
