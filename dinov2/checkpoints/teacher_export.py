"""Writing teacher checkpoints: our self-describing teacher file (atomically) and the published block layout.

The teacher file is ``torch.save({"teacher": {backbone.*, dino_head.*, ibot_head.*},
"config": <resolved config as plain dicts/lists/scalars>, "iteration": int, "format_version": 1})``.
Only plain containers are stored so the file loads with ``torch.load(weights_only=True)`` and
:func:`dinov2.checkpoints.backbone_reader.load_pretrained_backbone` can rebuild the backbone from
it alone. :func:`to_published_layout` renames a backbone to the published 3DINO-ViT block layout.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dinov2.utils.io import atomic_torch_save

from .layouts import TEACHER_FORMAT_VERSION, normalize_state_dict_keys

_SCALARS = (str, int, float, bool, type(None))
_FLAT_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def to_plain_config(config: Any, _where: str = "config") -> Any:
    """Convert a (resolved) config to dicts, lists and scalars that ``weights_only`` loading accepts.

    Args:
        config: an OmegaConf ``DictConfig``/``ListConfig`` or nested mappings / sequences.

    Returns:
        The same content as plain ``dict`` / ``list`` / str / int / float / bool / None;
        tuples become lists and path objects strings.

    Raises:
        ValueError: a value of another type (named by its dotted key).
    """
    from omegaconf import OmegaConf  # noqa: PLC0415 - only the writing side needs omegaconf

    if OmegaConf.is_config(config):
        config = OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        out = {}
        for key, value in config.items():
            if not isinstance(key, str):
                raise ValueError(f"{_where}: key {key!r} is not a string; checkpoint configs need string keys")
            out[key] = to_plain_config(value, f"{_where}.{key}")
        return out
    if isinstance(config, (list, tuple)):
        return [to_plain_config(v, f"{_where}[{i}]") for i, v in enumerate(config)]
    if isinstance(config, os.PathLike):
        return os.fspath(config)
    if isinstance(config, _SCALARS):
        return config
    raise ValueError(f"{_where} holds a {type(config).__name__}; a checkpoint config may only hold "
                     "dicts, lists, strings, numbers, booleans and None")


def save_teacher_checkpoint(path: str | os.PathLike, teacher_state_dict: Mapping[str, torch.Tensor],
                            config: Any, iteration: int) -> Path:
    """Write our self-describing teacher checkpoint atomically.

    Args:
        path: destination, e.g. ``<output>/eval/training_<iter>/teacher_checkpoint.pth``.
        teacher_state_dict: ``backbone.*``, ``dino_head.*``, ``ibot_head.*`` tensors (``module.`` /
            ``_orig_mod.`` segments are removed; tensors are moved to CPU).
        config: the resolved training config (DictConfig or nested dict) with a ``student``
            section, so the backbone can be rebuilt from the file alone.
        iteration: training iteration the weights belong to.

    Returns:
        The destination path.

    Raises:
        ValueError: no ``backbone.*`` tensors, a non-tensor value, a negative iteration, or a
            config value that is not a plain container/scalar.
    """
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration must be a non-negative int, got {iteration!r}")
    bad = [k for k, v in teacher_state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"teacher_state_dict values must be tensors; not for {bad[:5]}")
    state, _, _ = normalize_state_dict_keys(teacher_state_dict)
    if not any(k.startswith("backbone.") for k in state):
        raise ValueError("teacher_state_dict has no 'backbone.*' tensors; pass the state dict of the module "
                         "that owns backbone, dino_head and ibot_head")
    plain = to_plain_config(config)
    if not isinstance(plain, dict) or not isinstance(plain.get("student"), dict):
        raise ValueError("config must be a mapping with a 'student' section (student.arch, patch_size, ...)")
    payload = {
        "teacher": {k: v.detach().cpu() for k, v in state.items()},
        "config": plain,
        "iteration": iteration,
        "format_version": TEACHER_FORMAT_VERSION,
    }
    return atomic_torch_save(payload, path)


def to_published_layout(backbone_state_dict: Mapping[str, torch.Tensor], block_chunks: int = 4
                        ) -> dict[str, torch.Tensor]:
    """Rename a flat backbone state dict to the published 3DINO-ViT layout.

    ``blocks.<i>.<param>`` becomes ``backbone.blocks.<chunk>.<i>.<param>`` with chunk ``c``
    holding blocks ``c*depth/block_chunks`` … ``(c+1)*depth/block_chunks - 1``; every other
    name gets the ``backbone.`` prefix. Tensors are not copied.

    Args:
        backbone_state_dict: our model's ``state_dict()`` (flat block names).
        block_chunks: number of chunks; must divide the depth.

    Returns:
        The renamed dict (add ``dino_head.*`` / ``ibot_head.*`` and wrap in ``{"teacher": ...}``
        for the full published file).

    Raises:
        ValueError: ``block_chunks`` < 1 or not a divisor of the depth.
    """
    indices = {int(m.group(1)) for k in backbone_state_dict if (m := _FLAT_BLOCK.match(k))}
    depth = max(indices) + 1 if indices else 0
    if block_chunks < 1 or (depth and depth % block_chunks):
        raise ValueError(f"block_chunks ({block_chunks}) must be >= 1 and divide the depth ({depth})")
    per_chunk = depth // block_chunks if depth else 1
    out = {}
    for key, value in backbone_state_dict.items():
        m = _FLAT_BLOCK.match(key)
        if m:
            index = int(m.group(1))
            key = f"blocks.{index // per_chunk}.{index}.{m.group(2)}"
        out[f"backbone.{key}"] = value
    return out
