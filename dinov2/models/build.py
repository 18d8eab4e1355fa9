"""Building a backbone from a description: a training config, a registry name, or ``none``.

The one reader of the ``student.*`` keys, shared by the trainer (the student and the teacher it
builds), the checkpoint reader (a teacher file embeds the resolved config it was trained with)
and the demo. Config keys read (all optional except ``student.arch``; absent ones keep the
factory defaults of :mod:`dinov2.models.registry`):

==================================  ==========================================================
``student.arch``                    factory name, ``vit_large`` or ``vit_large_3d`` (required)
``student.patch_size``              patch side
``student.in_chans``                input channels
``student.embed_dim``               width (overrides the factory's; null keeps it)
``student.depth``                   blocks (overrides the factory's; null keeps it)
``student.num_heads``               heads (overrides the factory's; null keeps it)
``student.mlp_ratio``               MLP hidden width / embed_dim (null keeps the factory's)
``student.qkv_bias``                bias of the qkv projection
``student.proj_bias``               bias of the attention output projection
``student.ffn_bias``                biases of the feed-forward layers
``student.layerscale``              LayerScale init (``init_values``; null or 0 = off)
``student.ffn_layer``               ``mlp``, ``swiglu`` or ``swiglufused``
``student.num_register_tokens``     register tokens
``student.interpolate_offset``      position-embedding interpolation offset
``crops.global_crops_size``         native input size (``img_size``; int or 3 ints)
==================================  ==========================================================

``student.drop_path_rate`` / ``drop_path_uniform`` are not read here: a teacher file holds the
EMA teacher, which trains without stochastic depth (the trainer adds them for the student).

The random-init baseline (``--pretrained-weights none``) is built here too
(:func:`is_random_init`, :func:`build_random_backbone`): no file is read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dinov2.utils.errors import UserError

from .registry import MODEL_REGISTRY, build_model
from .vision_transformer import VisionTransformer3D

logger = logging.getLogger(__name__)

CONFIG_KEYS = {  # config key under `student` -> VisionTransformer3D argument
    "patch_size": "patch_size", "in_chans": "in_chans", "embed_dim": "embed_dim", "depth": "depth",
    "num_heads": "num_heads", "mlp_ratio": "mlp_ratio", "qkv_bias": "qkv_bias", "proj_bias": "proj_bias",
    "ffn_bias": "ffn_bias", "layerscale": "init_values", "ffn_layer": "ffn_layer", "num_register_tokens": "num_register_tokens",
    "interpolate_offset": "interpolate_offset",
}
# Keys whose null value means "the factory's default" (layerscale's null means "off" instead).
FACTORY_WHEN_NULL = ("embed_dim", "depth", "num_heads", "mlp_ratio")
# --pretrained-weights values that ask for a random-init backbone (compared case-insensitively).
RANDOM_INIT_NAMES = ("none",)


class BackboneConfigError(UserError, ValueError):
    """A config (or architecture name) that describes no buildable backbone; the message names where."""


def resolve_arch(name: str, where: str | os.PathLike = "<config>") -> str:
    """The registry name of ``name``: itself, or ``<name>_3d`` (``vit_large`` is ``vit_large_3d``).

    Raises:
        BackboneConfigError: neither is registered (the message starts with ``where``).
    """
    for candidate in (name, f"{name}_3d"):
        if candidate in MODEL_REGISTRY:
            return candidate
    raise BackboneConfigError(f"{Path(where)}: unknown architecture '{name}'. "
                              f"Available: {', '.join(sorted(MODEL_REGISTRY))}")


def backbone_kwargs_from_config(config: Mapping[str, Any], path: str | os.PathLike = "<config>"
                                ) -> tuple[str, dict[str, Any]]:
    """Registry name and overrides of the backbone described by a resolved training config.

    Args:
        config: plain nested dict with a ``student`` section (keys in the module docstring).
        path: file the config came from, for error messages.

    Returns:
        ``(arch, kwargs)`` for :func:`dinov2.models.registry.build_model`.

    Raises:
        BackboneConfigError: no ``student.arch`` or an unknown one.
    """
    path = Path(path)
    student = config.get("student")
    if not isinstance(student, Mapping) or not student.get("arch"):
        raise BackboneConfigError(f"{path}: the embedded config has no student.arch; pass arch=... or a model.")
    # null width/depth/heads/MLP ratio (the packaged config's values) keep the factory's own.
    kwargs = {arg: student[key] for key, arg in CONFIG_KEYS.items()
              if key in student and not (key in FACTORY_WHEN_NULL and student[key] is None)}
    if "patch_size" in kwargs and not isinstance(kwargs["patch_size"], int):
        kwargs["patch_size"] = tuple(kwargs["patch_size"])
    crops = config.get("crops")
    if isinstance(crops, Mapping) and crops.get("global_crops_size") is not None:
        size = crops["global_crops_size"]
        kwargs["img_size"] = size if isinstance(size, int) else tuple(size)
    return resolve_arch(str(student["arch"]), path), kwargs


def build_configured_backbone(arch: str, kwargs: dict[str, Any], where: str | os.PathLike = "the training config"
                              ) -> VisionTransformer3D:
    """:func:`~dinov2.models.registry.build_model` for ``student.*`` values a user wrote.

    A shape the transformer refuses (heads that do not divide the width) becomes a
    :class:`BackboneConfigError` naming the keys to change, instead of a traceback.

    Args:
        arch, kwargs: from :func:`backbone_kwargs_from_config`.
        where: the config's file, for the message.

    Returns:
        The backbone, randomly initialised.
    """
    try:
        return build_model(arch, **kwargs)
    except UserError:
        raise
    except ValueError as exc:
        raise BackboneConfigError(f"{where}: student.* describes no buildable {arch} ({exc}). Set "
                                  "student.embed_dim and student.num_heads so the heads divide the width "
                                  "(e.g. 96 and 4), or leave both null for the architecture's own.") from exc


def is_random_init(weights: str | os.PathLike | None) -> bool:
    """Whether a ``--pretrained-weights`` value asks for the random-init baseline (``none``, any case).

    Args:
        weights: the value given, or None.

    Returns:
        True for ``none`` / ``None`` / ``NONE``...; False for anything else, None included (an
        absent value is the caller's error to report, not a silent baseline).
    """
    return weights is not None and str(weights).strip().lower() in RANDOM_INIT_NAMES


def build_random_backbone(arch: str, backbone_kwargs: Mapping[str, Any] | None = None,
                          img_size: int | tuple[int, int, int] | None = None, flag: str = "--arch",
                          seed: int | None = None) -> tuple[VisionTransformer3D, dict[str, Any]]:
    """The explicit random-init baseline of ``--pretrained-weights none``: no file is read.

    Args:
        arch: registry name (``vit_large_3d``; ``vit_large`` is accepted too).
        backbone_kwargs: constructor overrides (``patch_size``, ``in_chans``...).
        img_size: native input size; overrides ``backbone_kwargs["img_size"]``.
        flag: how the caller's user sets ``arch``, named in the error.
        seed: torch seed of the initialisation (the caller's RNG state is left as it was), so the
            same seed gives the same baseline run after run; None draws from the current state.

    Returns:
        ``(backbone in training mode, the kwargs it was built with, arch included)``.

    Raises:
        ValueError: no or an unknown ``arch``.
    """
    if not arch:
        raise ValueError(f"--pretrained-weights none builds a random-init backbone, but no architecture was "
                         f"given: set {flag} (a registry name, e.g. vit_large_3d).")
    try:
        name = resolve_arch(str(arch))
    except BackboneConfigError:
        raise ValueError(f"Unknown architecture '{arch}' ({flag}). "
                         f"Available: {', '.join(sorted(MODEL_REGISTRY))}") from None
    kwargs = dict(backbone_kwargs or {})
    if img_size is not None:
        kwargs["img_size"] = img_size
    logger.info("Backbone %s randomly initialised (--pretrained-weights none): a random-init baseline, "
                "not a pretrained model.", name)
    if seed is None:
        return build_model(name, **kwargs), {"arch": name, **kwargs}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build_model(name, **kwargs), {"arch": name, **kwargs}
