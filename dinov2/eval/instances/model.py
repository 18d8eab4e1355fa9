"""The distance model of instance segmentation, its sliding-window prediction and its checkpoint.

The model is a segmentation model of :mod:`dinov2.eval.segmentation.model` (a 3D ViT backbone,
four taps, one of its heads) with ONE output channel squashed by a sigmoid into [0, 1], the range
of the per-object normalised distance target (:func:`.targets.distance_target`). Backbone and
head come from the segmentation code (:func:`~dinov2.eval.segmentation.model.build_backbone`,
:func:`~dinov2.eval.segmentation.model.build_head`, ``head_options``), so every head, every head
option and the backbone keys (``model.head``, ``model.train_backbone``, ``model.arch``,
``model.<head section>``) mean what they mean in segmentation finetuning.

``best_model.pth`` (``FORMAT``) is self-describing, like the segmentation one, and holds what
``segment`` needs besides the weights::

    {"format": "dinov2_3d_instances", "format_version": 1, "model": state dict,
     "backbone": {"arch", "kwargs"}, "head": str, "config": resolved run config (plain dict;
     preprocessing in "dataset", sliding window in "evaluation", minimum size in "postprocess"),
     "thresholds": {"cells_max", "cell_fill"}, "iteration": int, "metric": {"name", "value"}}
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from omegaconf import DictConfig, OmegaConf

from dinov2.checkpoints.layouts import load_torch_file
from dinov2.eval.segmentation.model import (SegmentationModel, backbone_from_spec, build_backbone, build_head,
                                           head_options)
from dinov2.utils.config import load_yaml, packaged_config_path
from dinov2.utils.errors import UserError
from dinov2.utils.io import atomic_torch_save

from .data import Preprocessing, model_input, to_stack_grid
from .io import Stack

FORMAT, FORMAT_VERSION = "dinov2_3d_instances", 1
DEFAULT_CONFIG = "eval/instances_default"
SEGMENTATION_CONFIG = "eval/segmentation_default"  # its model section holds the heads' options
CHECKPOINT_EXPECTED = "the best_model.pth written by python -m dinov2.eval.instances train in its --output-dir"


def packaged_defaults() -> DictConfig:
    """Every key of a run config: ``instances_default.yaml`` over the ``model`` section of
    ``segmentation_default.yaml`` (the heads' options are segmentation's)."""
    heads = OmegaConf.create({"model": load_yaml(packaged_config_path(SEGMENTATION_CONFIG)).model})
    return OmegaConf.merge(heads, load_yaml(packaged_config_path(DEFAULT_CONFIG)))


class DistanceModel(SegmentationModel):
    """Backbone + head with one sigmoid output: ``(B, C, X, Y, Z)`` → distance ``(B, 1, X, Y, Z)`` in [0, 1].

    Built by :func:`build_distance_model`; a frozen backbone gets no gradient and stays in eval
    mode (:class:`~dinov2.eval.segmentation.model.SegmentationModel`).
    """

    def forward(self, image: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Predicted distance ``(B, 1, X, Y, Z)`` (a list at decreasing resolution when a head with
        deep supervision is training); the sigmoid takes float32 logits (bf16 would round a
        distance near 1 to steps of 1/128)."""
        out = super().forward(image)
        if isinstance(out, list):
            return [torch.sigmoid(o.float()) for o in out]
        return torch.sigmoid(out.float())


def assemble_distance_model(backbone, model_cfg: Mapping[str, Any], in_channels: int = 1) -> DistanceModel:
    """:class:`DistanceModel` of ``model_cfg["head"]`` (options from its section) on ``backbone``."""
    head_name = model_cfg["head"]
    head = build_head(head_name, backbone, in_channels, 1, head_options(model_cfg, head_name))
    return DistanceModel(backbone, head_name, head, in_channels, str(model_cfg["modality_merge"]),
                         train_backbone=bool(model_cfg["train_backbone"]))


def build_distance_model(pretrained_weights: str, model_cfg: Mapping[str, Any], roi_size: Sequence[int],
                         in_channels: int = 1) -> tuple[DistanceModel, dict]:
    """The model to train: a teacher checkpoint's backbone (or ``none``: random init) under a head.

    Args:
        pretrained_weights: teacher checkpoint path, or ``"none"`` for an explicit random
            initialisation (``model_cfg["arch"]`` / ``backbone_kwargs`` then say which ViT).
        model_cfg: the ``model`` config section (``head``, ``train_backbone``, ``arch``,
            ``backbone_kwargs``, ``modality_merge`` and the heads' option sections).
        roi_size: training crop = sliding window ``(X, Y, Z)``, multiples of the patch size.
        in_channels: image channels.

    Returns:
        ``(model, backbone spec)``; the spec rebuilds the architecture (stored in the checkpoint).

    Raises:
        FileNotFoundError: ``pretrained_weights`` names no file.
        ValueError: an unknown head or architecture, a crop that is not a multiple of the patch.
    """
    backbone, spec = build_backbone(pretrained_weights, model_cfg["arch"], model_cfg["backbone_kwargs"], roi_size)
    return assemble_distance_model(backbone, model_cfg, in_channels), spec


def predict_distance(model: torch.nn.Module, image: torch.Tensor, roi_size: Sequence[int], overlap: float = 0.5,
                     sw_batch_size: int = 4, autocast: contextlib.AbstractContextManager | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Distance map of a whole stack by sliding windows blended with Gaussian weights.

    The sigmoid outputs (not logits) are blended: they are the distances the thresholds apply to.

    Args:
        model: maps ``(b, C, *roi_size)`` to ``(b, 1, *roi_size)`` in [0, 1]; run in eval mode.
        image: ``(B, C, X, Y, Z)`` on the host (padded internally where smaller than a window).
        roi_size: window size.
        overlap: window overlap in ``[0, 1)``.
        sw_batch_size: windows per forward pass.
        autocast: context of the forward passes (mixed precision), None for fp32.
        device: where the windows run (default: the image's device).

    Returns:
        float32 ``(B, 1, X, Y, Z)`` on the image's device.
    """

    def run(x: torch.Tensor) -> torch.Tensor:
        with autocast or contextlib.nullcontext():
            return model(x)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = sliding_window_inference(image, list(roi_size), sw_batch_size, run, overlap=overlap,
                                           mode="gaussian", sw_device=device, device=image.device)
    finally:
        model.train(was_training)
    return torch.as_tensor(out).float()


def stack_distance(model: torch.nn.Module, stack: Stack, prep: Preprocessing, overlap: float = 0.5,
                   sw_batch_size: int = 4, autocast: contextlib.AbstractContextManager | None = None,
                   device: torch.device | str | None = None) -> np.ndarray:
    """The predicted distance map of an image stack, on the stack's own grid.

    Preprocessed as in training (:func:`.data.model_input`), predicted by :func:`predict_distance`
    on the resampled grid, and resampled back (trilinear), where the watershed runs.

    Returns:
        ``(X, Y, Z)`` float32 in [0, 1], the shape of ``stack.array``.
    """
    image = model_input(stack, prep)[None]
    distance = predict_distance(model, image, prep.roi_size, overlap, sw_batch_size, autocast, device)
    return to_stack_grid(distance[0], stack)


def save_distance_model(path: str | os.PathLike, model: DistanceModel, backbone_spec: Mapping[str, Any],
                        config: Mapping[str, Any], thresholds: Mapping[str, float], iteration: int,
                        metric: Mapping[str, Any]) -> Path:
    """Write the self-describing checkpoint atomically (layout in the module docstring)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return atomic_torch_save({
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": state, "backbone": dict(backbone_spec),
        "head": model.head_name, "config": dict(config),
        "thresholds": {k: float(v) for k, v in thresholds.items()}, "iteration": int(iteration),
        "metric": dict(metric)}, path)


class InstanceCheckpointError(UserError, ValueError):
    """A ``--checkpoint`` that is no instance segmentation model; the message names the file and the fix."""


def load_distance_model(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                        ) -> tuple[DistanceModel, dict]:
    """Rebuild the trained distance model from its checkpoint alone.

    Returns:
        ``(model in eval mode, the checkpoint without the weights)``: ``config`` (the run's, over
        the packaged defaults), ``thresholds``, ``iteration``, ``metric``, ``head``, ``backbone``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a torch checkpoint.
        InstanceCheckpointError: a torch file of another kind (a teacher, a segmentation model).
    """
    path, ckpt = load_torch_file(path, "cpu", True, expected=CHECKPOINT_EXPECTED,
                                 hint="Check the path given with --checkpoint.")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InstanceCheckpointError(f"{path} is not an instance segmentation checkpoint (no format '{FORMAT}'). "
                                      f"Pass {CHECKPOINT_EXPECTED}.")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise InstanceCheckpointError(f"{path} has format_version {ckpt['format_version']}; this toolkit reads up "
                                      f"to {FORMAT_VERSION}. Update the toolkit.")
    # keys an older checkpoint's config lacks take the packaged defaults
    config = OmegaConf.to_container(OmegaConf.merge(packaged_defaults(), ckpt["config"]), resolve=True)
    model = assemble_distance_model(backbone_from_spec(ckpt["backbone"]), dict(config["model"], train_backbone=False))
    model.load_state_dict(ckpt["model"], strict=True)
    return model.to(map_location).eval(), {**{k: v for k, v in ckpt.items() if k != "model"}, "config": config}
