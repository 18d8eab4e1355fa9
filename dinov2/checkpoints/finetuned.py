"""The finetuned segmentation model's self-describing checkpoint: weights + resolved config + preset.

``best_model.pth`` holds everything :mod:`dinov2.eval.segmentation.predict` needs, and nothing
else has to be at hand (no pretrained checkpoint, no preset file, no datalist)::

    {"format": "dinov2_3d_segmentation", "format_version": 1,
     "model": state dict (backbone.*, head.*, merge.*),
     "backbone": {"arch": name or None, "kwargs": {...}},  # rebuilds the architecture
     "head": one of dinov2.eval.segmentation.model.HEAD_NAMES (UNETR, ViTAdapterUNETR, Linear, DinoUNet, DPT, UNetFusion),
     "config": resolved run config (plain dict), "preset": dataset section (plain dict),
     "iteration": int, "metric": {"name": str, "value": float}}

Only plain containers and tensors are stored, so it loads with ``torch.load(weights_only=True)``.
Rebuilding the model needs the segmentation heads (:mod:`dinov2.eval.segmentation.model`), which
themselves read backbones through this package: they are imported when a model is rebuilt.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from dinov2.eval.presets import DatasetPreset
from dinov2.utils.io import atomic_torch_save

from .layouts import FINETUNED_SEGMENTATION_FORMAT, load_torch_file

if TYPE_CHECKING:
    from dinov2.eval.segmentation.model import SegmentationModel

FORMAT = FINETUNED_SEGMENTATION_FORMAT
FORMAT_VERSION = 1


def save_finetuned(path: str | os.PathLike, model: SegmentationModel, backbone_spec: Mapping[str, Any],
                   config: Mapping[str, Any], preset: DatasetPreset, iteration: int,
                   metric: Mapping[str, Any]) -> Path:
    """Write the self-describing checkpoint atomically (see the module docstring)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return atomic_torch_save({
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": state,
        "backbone": dict(backbone_spec), "head": model.head_name, "config": dict(config),
        "preset": dict(preset.raw), "iteration": int(iteration), "metric": dict(metric),
    }, path)


def load_finetuned(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                   ) -> tuple[SegmentationModel, DatasetPreset, dict]:
    """Rebuild the finetuned model from its checkpoint alone.

    Args:
        path: ``best_model.pth`` written by :func:`save_finetuned`.
        map_location: device of the model.

    Returns:
        ``(model in eval mode, preset, the checkpoint dict without the weights)``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a torch checkpoint (a text file, an image, a truncated copy).
        ValueError: not a finetuned-segmentation checkpoint (e.g. a pretraining teacher file).
    """
    expected = "the best_model.pth written by python -m dinov2.eval.segmentation in its --output-dir"
    path, ckpt = load_torch_file(path, "cpu", True, expected=expected, hint="Check the path given with --checkpoint.")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a finetuned segmentation checkpoint (no format '{FORMAT}'). A pretraining "
                         "checkpoint must be finetuned first with python -m dinov2.eval.segmentation.")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {ckpt['format_version']}; this toolkit reads up to "
                         f"{FORMAT_VERSION}. Update the toolkit.")
    from dinov2.eval.segmentation.model import (  # noqa: PLC0415 - see the module docstring
        backbone_from_spec,
        build_segmentation_model,
        head_options,
    )

    preset = DatasetPreset.from_config(ckpt["preset"])
    config = ckpt["config"]
    backbone = backbone_from_spec(ckpt["backbone"])
    # Model keys an older checkpoint's config lacks take the packaged defaults (segmentation_default.yaml).
    from omegaconf import OmegaConf  # noqa: PLC0415

    from dinov2.utils.config import load_yaml, packaged_config_path  # noqa: PLC0415

    defaults = load_yaml(packaged_config_path("eval/segmentation_default")).model
    model_cfg = OmegaConf.to_container(OmegaConf.merge(defaults, config.get("model") or {}), resolve=True)
    model = build_segmentation_model(
        backbone, ckpt["head"], preset.in_channels, preset.out_channels,
        head_options=head_options(model_cfg, ckpt["head"]), merge_mode=model_cfg["modality_merge"])
    model.load_state_dict(ckpt["model"], strict=True)
    info = {k: v for k, v in ckpt.items() if k != "model"}
    return model.to(map_location).eval(), preset, info
