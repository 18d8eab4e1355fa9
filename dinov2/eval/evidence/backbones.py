"""The backbones compared: pretrained teachers read from their checkpoints, random inits of the same shape.

Accepted files: our teacher checkpoint (written by pretraining), the published 3DINO-ViT teacher,
a bare backbone state dict, or a training checkpoint whose teacher half is taken. Refused: a
finetuned segmentation model (its backbone was trained with labels) and any wrapper that holds
no teacher (e.g. a student or a classifier), since their features are no evidence of pretraining.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dinov2.checkpoints.backbone_reader import load_pretrained_backbone
from dinov2.checkpoints.errors import CheckpointError, FinetunedModelError
from dinov2.checkpoints.layouts import HINT as LOADER_HINT  # its "--pretrained-weights" advice
from dinov2.models.registry import build_model
from dinov2.models.vision_transformer import VisionTransformer3D

from .errors import EvidenceError

TEACHER_LAYOUTS = ("dinov2_3d_teacher_v1", "3dino_published", "plain_state_dict")
FIX = ("Pass the pretraining teacher file, <output>/eval/training_<iter>/teacher_checkpoint.pth "
       "(python -m dinov2.train.train3d writes it).")


@dataclass
class Teacher:
    """A pretrained backbone and what its file says about it.

    Attributes:
        path: the checkpoint file.
        model: the backbone, eval mode, float32, on the CPU.
        spec: ``{"arch": registry name or None, "kwargs": {...}}``: builds the same architecture.
        config: the embedded training config (plain dict) or None.
        source_format: the checkpoint layout the loader detected.
    """

    path: Path
    model: VisionTransformer3D
    spec: dict[str, Any]
    config: dict | None
    source_format: str


def _loader_message(exc: Exception) -> str:
    # The loader's advice names --pretrained-weights; this command's flag is --teacher.
    return " ".join(str(exc).replace(LOADER_HINT, "").split())


def load_teacher(path: str | os.PathLike) -> Teacher:
    """Read a pretrained backbone for the evidence.

    Args:
        path: teacher checkpoint (see the module docstring for the accepted layouts).

    Returns:
        :class:`Teacher` with the backbone on the CPU in eval mode.

    Raises:
        EvidenceError: no such file, not a checkpoint, a finetuned model or no teacher in it,
            or a backbone that does not take single-channel volumes.
    """
    path = Path(path)
    if not path.is_file():
        raise EvidenceError(f"Teacher checkpoint not found: {path}. {FIX}")
    try:
        model, report = load_pretrained_backbone(path, map_location="cpu")
    except FinetunedModelError as exc:
        raise EvidenceError(f"{path} is a finetuned segmentation model: its backbone was trained with labels, so "
                            f"its features say nothing about pretraining. {FIX}") from exc
    except (CheckpointError, ValueError) as exc:
        message = _loader_message(exc)
        raise EvidenceError(message if "teacher_checkpoint.pth" in message else f"{message} {FIX}") from exc
    if report.source_format not in TEACHER_LAYOUTS and "teacher." not in report.stripped_prefixes:
        raise EvidenceError(f"{path} holds a '{report.source_format}' state dict with no teacher in it (a student, "
                            f"a classifier or another finetuned model?). {FIX}")
    if model.in_chans != 1:
        raise EvidenceError(f"{path}: the backbone takes {model.in_chans} input channels; the evidence feeds "
                            "single-channel T1 volumes. Evaluate a teacher pretrained on one channel.")
    kwargs = dict(report.model_kwargs)
    spec = {"arch": kwargs.pop("arch", None), "kwargs": kwargs}
    return Teacher(path, model.float().eval(), spec, report.config, report.source_format)


def random_backbone(spec: dict[str, Any], seed: int) -> VisionTransformer3D:
    """A randomly initialised backbone of the architecture ``spec`` describes.

    Args:
        spec: ``{"arch": registry name or None, "kwargs": {...}}`` (:attr:`Teacher.spec`).
        seed: torch seed of the initialisation.

    Returns:
        The backbone, eval mode, float32, on the CPU.
    """
    arch, kwargs = spec.get("arch"), dict(spec.get("kwargs") or {})
    with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        model = build_model(arch, **kwargs) if arch else VisionTransformer3D(**kwargs)
    return model.float().eval()


def _shape_signature(model: VisionTransformer3D) -> tuple:
    # Parameter shapes fix everything but the head count; two files may describe one model differently.
    shapes = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
    return shapes, model.num_heads


def same_architecture(teachers: list[Teacher]) -> dict[str, Any]:
    """The architecture spec random inits are built from (the first teacher's), once all teachers agree.

    Raises:
        EvidenceError: two teachers differ in parameter shapes or head count.
    """
    first = teachers[0]
    for teacher in teachers[1:]:
        if _shape_signature(teacher.model) != _shape_signature(first.model):
            raise EvidenceError(f"{teacher.path} has another architecture ({teacher.spec}) than {first.path} "
                                f"({first.spec}); random inits must match the teachers. Evaluate them in separate runs.")
    return first.spec
