"""Read backbone weights from any checkpoint layout we support, with a report of what happened.

Layouts accepted by :func:`load_pretrained_backbone` (detected, never guessed silently):

* **Our teacher checkpoint** (``format_version`` 1, written by
  :func:`dinov2.models.export.save_teacher_checkpoint`): ``{"teacher": {backbone.*, dino_head.*,
  ibot_head.*}, "config": dict, "iteration": int, "format_version": 1}``. With ``model=None``
  the backbone is rebuilt from the embedded config alone. Config keys read (all optional except
  ``student.arch``; absent ones keep the factory defaults of :mod:`dinov2.models.registry`):

  ==================================  ==========================================================
  ``student.arch``                    factory name, ``vit_large`` or ``vit_large_3d`` (required)
  ``student.patch_size``              patch side
  ``student.in_chans``                input channels
  ``student.embed_dim``               width (overrides the factory's)
  ``student.depth``                   blocks (overrides the factory's)
  ``student.num_heads``               heads (overrides the factory's)
  ``student.mlp_ratio``               MLP hidden width / embed_dim
  ``student.qkv_bias``                bias of the qkv projection
  ``student.proj_bias``               bias of the attention output projection
  ``student.ffn_bias``                biases of the feed-forward layers
  ``student.layerscale``              LayerScale init (``init_values``; null or 0 = off)
  ``student.ffn_layer``               ``mlp``, ``swiglu`` or ``swiglufused``
  ``student.num_register_tokens``     register tokens
  ``student.interpolate_offset``      position-embedding interpolation offset
  ``crops.global_crops_size``         native input size (``img_size``; int or 3 ints)
  ==================================  ==========================================================

  ``student.drop_path_rate`` / ``drop_path_uniform`` are deliberately not read: the file holds
  the EMA teacher, which trains without stochastic depth, so the rebuilt backbone has none
  (finetuning code that wants it sets ``block.drop_path`` itself).

* **The published 3DINO-ViT teacher checkpoint** (``{"teacher": {...}}``, no config): blocks
  stored in chunks as ``backbone.blocks.<chunk>.<global index>.<param>``. The architecture is
  inferred from tensor shapes (:func:`infer_backbone_kwargs`).
* **Plain backbone state dicts** (``cls_token``, ``blocks.<i>.*``, …) and dicts wrapped under
  ``teacher`` / ``model`` / ``state_dict`` / ``student`` (first found in that order, so the
  teacher wins), possibly with ``module.`` (DDP), ``_orig_mod.`` (torch.compile),
  ``backbone.`` or ``teacher.`` prefixes.

Heads (``dino_head.*``, ``ibot_head.*``) and any other non-backbone tensors are never
"unexpected": they are listed separately and the head state dicts are returned, prefix
stripped, in the report.
"""

from __future__ import annotations

import logging
import math
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .registry import MODEL_REGISTRY, build_model
from .vision_transformer import VisionTransformer3D, resample_pos_embed

logger = logging.getLogger(__name__)

TEACHER_FORMAT_VERSION = 1
# Searched in this order: the EMA teacher is the model meant for downstream use.
WRAPPER_KEYS = ("teacher", "model", "state_dict", "student")
# Path segments that wrappers insert into parameter names (DDP, torch.compile).
TRANSPARENT_SEGMENTS = ("module", "_orig_mod")
# embed_dim -> num_heads of the sizes our registry builds (head_dim 64; 16 for vit_tiny_3d).
KNOWN_NUM_HEADS = {64: 4, 384: 6, 768: 12, 1024: 16, 1536: 24}
CONFIG_KEYS = {  # config key under `student` -> VisionTransformer3D argument
    "patch_size": "patch_size", "in_chans": "in_chans", "embed_dim": "embed_dim", "depth": "depth",
    "num_heads": "num_heads", "mlp_ratio": "mlp_ratio", "qkv_bias": "qkv_bias", "proj_bias": "proj_bias",
    "ffn_bias": "ffn_bias", "layerscale": "init_values", "ffn_layer": "ffn_layer", "num_register_tokens": "num_register_tokens",
    "interpolate_offset": "interpolate_offset",
}
_CHUNKED_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")
_FLAT_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# Legacy (non-zip) torch.save files start with pickle protocol 2 and torch's magic number.
_LEGACY_TORCH_HEADER = b"\x80\x02\x8a\x0a" + bytes.fromhex("6cfc9c46f9206aa85019")
_HINT = "Check the path given with --pretrained-weights (or the `pretrained_weights` config key)."
# Marker of best_model.pth (dinov2.eval.segmentation.checkpoint.FORMAT; repeated here because models
# must not import eval). last_checkpoint.pth instead carries the resume-only key "frozen_from".
FINETUNED_SEGMENTATION_FORMAT = "dinov2_3d_segmentation"
# --pretrained-weights values that ask for a random-init backbone (compared case-insensitively).
RANDOM_INIT_NAMES = ("none",)


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used as asked; the message names the file and the fix."""


class FinetunedModelError(CheckpointError):
    """A finetuned segmentation model (or its resumable state) given where a backbone is expected."""


@dataclass
class CheckpointContents:
    """What :func:`read_checkpoint` found in a file, keys already normalised.

    Attributes:
        path: the file.
        source_format: ``"dinov2_3d_teacher_v1"`` (ours), ``"3dino_published"`` (teacher
            dict, no config), ``"wrapped:<key>"`` or ``"plain_state_dict"``.
        backbone: backbone tensors with flat names (``blocks.<i>.<param>``, no prefixes).
        heads: head state dicts by head name (``dino_head``, ``ibot_head``), prefix stripped.
        other_keys: remaining tensor names of the selected state dict (neither backbone nor head).
        top_level_keys: keys of the file's top-level dict.
        wrapper_key: the top-level key the state dict came from, if any.
        stripped_prefixes: prefixes removed from parameter names (``module.``, ``backbone.``…).
        chunked_blocks: whether blocks were stored as ``blocks.<chunk>.<index>``.
        config: the embedded config (plain dict) or None.
        iteration: the embedded iteration or None.
    """

    path: Path
    source_format: str
    backbone: dict[str, torch.Tensor]
    heads: dict[str, dict[str, torch.Tensor]]
    other_keys: list[str]
    top_level_keys: list[str]
    wrapper_key: str | None = None
    stripped_prefixes: list[str] = field(default_factory=list)
    chunked_blocks: bool = False
    config: dict | None = None
    iteration: int | None = None


@dataclass
class BackboneLoadReport:
    """What :func:`load_pretrained_backbone` did.

    Attributes:
        path: the file.
        source_format: see :class:`CheckpointContents`.
        loaded_keys: backbone parameters taken from the file.
        missing_keys: model parameters the file lacks (kept at their initial values).
        unexpected_keys: backbone tensors of the file the model has no place for.
        resized_keys: name -> (checkpoint shape, model shape) of resampled tensors.
        non_backbone_keys: head and other tensors of the file, ignored for the backbone.
        head_state_dicts: head name -> state dict with the head prefix stripped.
        built_from: ``"model"`` (given), ``"config"`` or ``"shapes"`` (inferred).
        model_kwargs: arguments the model was built with (empty when a model was given).
        wrapper_key, stripped_prefixes, chunked_blocks, config, iteration: from the file.
    """

    path: Path
    source_format: str
    loaded_keys: list[str] = field(repr=False)
    missing_keys: list[str]
    unexpected_keys: list[str]
    resized_keys: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    non_backbone_keys: list[str] = field(repr=False)
    head_state_dicts: dict[str, dict[str, torch.Tensor]] = field(repr=False)
    built_from: str = "model"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    wrapper_key: str | None = None
    stripped_prefixes: list[str] = field(default_factory=list)
    chunked_blocks: bool = False
    config: dict | None = field(default=None, repr=False)
    iteration: int | None = None

    def summary(self) -> str:
        """One human-readable paragraph for logs."""
        layout = self.source_format + (" (blocks stored in chunks)" if self.chunked_blocks else "")
        parts = [
            f"Loaded backbone from {self.path} [{layout}"
            + (f", iteration {self.iteration}" if self.iteration is not None else "") + "]:",
            f"{len(self.loaded_keys)} tensors loaded, {len(self.missing_keys)} missing, "
            f"{len(self.unexpected_keys)} unexpected.",
        ]
        if self.built_from != "model":
            parts.append(f"Model built from the {self.built_from}: {self.model_kwargs}.")
        if self.stripped_prefixes:
            parts.append(f"Stripped prefixes: {', '.join(repr(p) for p in self.stripped_prefixes)}.")
        for key, (old, new) in self.resized_keys.items():
            parts.append(f"Resized {key} {list(old)} -> {list(new)}.")
        if self.missing_keys:
            parts.append(f"Missing: {_preview(self.missing_keys)}.")
        if self.unexpected_keys:
            parts.append(f"Unexpected: {_preview(self.unexpected_keys)}.")
        if self.non_backbone_keys:
            heads = ", ".join(f"{k} ({len(v)} tensors)" for k, v in self.head_state_dicts.items())
            parts.append(f"Ignored {len(self.non_backbone_keys)} non-backbone tensors"
                         + (f" (heads: {heads})" if heads else "") + ".")
        return " ".join(parts)


def _preview(keys: list[str], limit: int = 12) -> str:
    """Readable list of keys; whole blocks collapse to ``blocks.<i>.* (n tensors)``."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        m = _FLAT_BLOCK.match(key)
        groups.setdefault(f"blocks.{m.group(1)}.*" if m else key, []).append(key)
    items = [name if len(members) == 1 and name == members[0] else f"{name} ({len(members)} tensors)"
             for name, members in groups.items()]
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# ----------------------------------------------------------------------------- reading the file
def _describe_non_checkpoint(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(352)
    if head[:4] == b"PK\x03\x04":
        return "it starts like a torch.save archive but is truncated or corrupt (interrupted copy?)"
    if head[:2] == b"\x1f\x8b":
        return "it is gzip-compressed (a .nii.gz image?)"
    if head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "it is a NIfTI image"
    if head[:4] == b"DICM" or head[128:132] == b"DICM":
        return "it is a DICOM file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "its content is not a torch.save archive"
    return "it is a text file"


def _load_file(path: str | os.PathLike, map_location, weights_only: bool) -> tuple[Path, Any]:
    """``torch.load`` with errors that name the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint file not found: {path}. {_HINT}")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint path {path} is not a file. {_HINT}")
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        with open(path, "rb") as fh:
            if fh.read(len(_LEGACY_TORCH_HEADER)) != _LEGACY_TORCH_HEADER:
                raise CheckpointError(
                    f"{path} is not a PyTorch checkpoint ({_describe_non_checkpoint(path)}). "
                    f"Pass the .pth file written by training (teacher_checkpoint.pth). {_HINT}")
    # No mmap: parameters backed by the file would crash (SIGBUS) if it were overwritten in place.
    try:
        obj = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name and a fix
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if weights_only and "weights only" in str(exc).lower():
            raise CheckpointError(
                f"{path} holds Python objects that safe loading (torch.load weights_only=True) refuses: "
                f"{first_line} ... Re-save it with plain containers (dicts, lists, numbers, strings, tensors), "
                "or, only if you trust its source, load it with weights_only=False "
                "(that can execute code stored in the file).") from exc
        raise CheckpointError(f"Could not read checkpoint {path} (corrupt or truncated?): {first_line}") from exc
    return path, obj


def is_random_init(weights: str | os.PathLike | None) -> bool:
    """Whether a ``--pretrained-weights`` value asks for the random-init baseline (``none``, any case).

    Args:
        weights: the value given, or None.

    Returns:
        True for ``none`` / ``None`` / ``NONE``...; False for anything else, None included (an
        absent value is the caller's error to report, not a silent baseline).
    """
    return weights is not None and str(weights).strip().lower() in RANDOM_INIT_NAMES


def _finetuned_segmentation_error(path: Path, obj: Mapping) -> FinetunedModelError | None:
    """The error for a segmentation3d output given where a backbone is expected, else None."""
    if obj.get("format") == FINETUNED_SEGMENTATION_FORMAT:
        kind = "a finetuned segmentation model (best_model.pth of python -m dinov2.eval.segmentation3d)"
        config = obj.get("config") if isinstance(obj.get("config"), Mapping) else {}
        source = config.get("pretrained_weights")
        model_cfg = config.get("model") if isinstance(config.get("model"), Mapping) else {}
        trained = bool(model_cfg.get("train_backbone"))
    elif "frozen_from" in obj and isinstance(obj.get("model"), Mapping):
        kind = "the resumable state of a segmentation finetuning run (last_checkpoint.pth)"
        source, trained = obj.get("frozen_from"), False
    else:
        return None
    parts = [f"{path} is {kind}, not a backbone/teacher checkpoint."]
    if is_random_init(source):
        parts.append("Its backbone was randomly initialised (--pretrained-weights none): no teacher checkpoint "
                     "lies behind it. Pass a teacher_checkpoint.pth, or --pretrained-weights none for the "
                     "random-init baseline.")
    elif source:
        parts.append(f"Its backbone was finetuned from {source}: pass that file with --pretrained-weights"
                     + (" (the finetuned run also trained the backbone, so its weights differ)." if trained else "."))
    else:
        parts.append("Pass the teacher_checkpoint.pth it was finetuned from with --pretrained-weights.")
    # last_checkpoint.pth may lack a frozen backbone; best_model.pth beside it always holds it all.
    best = path if obj.get("format") == FINETUNED_SEGMENTATION_FORMAT else path.with_name("best_model.pth")
    parts.append(f"To use the finetuned backbone itself (the 'backbone.' keys of {best}), in Python: "
                 "from dinov2.eval.segmentation.checkpoint import load_finetuned; "
                 f"backbone = load_finetuned('{best}')[0].backbone")
    return FinetunedModelError(" ".join(parts))


# ----------------------------------------------------------------------------- key normalisation
def normalize_state_dict_keys(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str], bool]:
    """Drop wrapper segments and unchunk block names.

    ``module.`` / ``_orig_mod.`` segments are removed wherever they appear, and
    ``blocks.<chunk>.<global index>.<param>`` becomes ``blocks.<global index>.<param>`` (also
    under a prefix such as ``backbone.``).

    Args:
        state_dict: name -> tensor.

    Returns:
        ``(renamed dict, sorted removed prefixes, whether chunked block names were found)``.

    Raises:
        CheckpointError: two names collapse to one (e.g. the same block in two chunks).
    """
    out: dict[str, Any] = {}
    stripped: set[str] = set()
    chunked = False
    for key, value in state_dict.items():
        parts = key.split(".")
        kept = [p for p in parts if p not in TRANSPARENT_SEGMENTS]
        stripped.update(p + "." for p in parts if p in TRANSPARENT_SEGMENTS)
        new = ".".join(kept)
        prefix, sep, rest = new.partition("blocks.")
        if sep and (not prefix or prefix.endswith(".")):
            m = _CHUNKED_BLOCK.match(sep + rest)
            if m:
                new = f"{prefix}blocks.{m.group(2)}.{m.group(3)}"
                chunked = True
        if new in out:
            raise CheckpointError(f"Parameter name '{new}' occurs twice after normalising '{key}'")
        out[new] = value
    return out, sorted(stripped), chunked


def _split_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def read_checkpoint(path: str | os.PathLike, map_location="cpu", weights_only: bool = True) -> CheckpointContents:
    """Load a checkpoint file and split it into backbone, heads and the rest.

    Args:
        path: ``.pth`` file in any supported layout (see the module docstring).
        map_location: passed to ``torch.load``.
        weights_only: safe loading (default). Set False only for files you trust.

    Returns:
        :class:`CheckpointContents` with flat, prefix-free backbone names.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: not a checkpoint, unreadable, newer format, no tensors in it, or a
            finetuned segmentation model (the message names the teacher it came from).
    """
    path, obj = _load_file(path, map_location, weights_only)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors. {_HINT}")
    finetuned = _finetuned_segmentation_error(path, obj)
    if finetuned is not None:  # checked first: its head.* keys would otherwise fail key normalisation obscurely
        raise finetuned
    top_level = [str(k) for k in obj]
    version = obj.get("format_version")
    if isinstance(version, int) and version > TEACHER_FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {version}; this toolkit reads up to "
                              f"{TEACHER_FORMAT_VERSION}. Update the toolkit to load it.")
    wrapper = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    state = obj[wrapper] if wrapper else obj
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} contains no tensors (top-level keys: {_preview(top_level)}). {_HINT}")
    tensors, stripped, chunked = normalize_state_dict_keys(tensors)
    # A whole meta-architecture (student.* and teacher.*) saved as one state dict: take the teacher.
    for role in ("teacher.", "student."):
        if any(k.startswith(role) for k in tensors):
            tensors = _split_prefix(tensors, role)
            stripped.append(role)
            break
    if any(k.startswith("backbone.") for k in tensors):
        backbone = _split_prefix(tensors, "backbone.")
        stripped.append("backbone.")
        rest = {k: v for k, v in tensors.items() if not k.startswith("backbone.")}
    else:
        backbone, rest = {}, {}
        for k, v in tensors.items():
            (rest if k.split(".")[0].endswith("_head") else backbone)[k] = v
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in rest.items():
        name = k.split(".")[0]
        if name.endswith("_head") and "." in k:
            heads.setdefault(name, {})[k[len(name) + 1:]] = v
    other = sorted(k for k in rest if k.split(".")[0] not in heads)

    config = obj.get("config") if isinstance(obj.get("config"), Mapping) else None
    iteration = obj.get("iteration") if isinstance(obj.get("iteration"), int) else None
    if version == TEACHER_FORMAT_VERSION and wrapper == "teacher":
        source = "dinov2_3d_teacher_v1"
    elif wrapper == "teacher" and config is None and "backbone." in stripped:
        source = "3dino_published"
    else:
        source = f"wrapped:{wrapper}" if wrapper else "plain_state_dict"
    return CheckpointContents(
        path=path, source_format=source, backbone=backbone, heads=heads, other_keys=other,
        top_level_keys=top_level, wrapper_key=wrapper, stripped_prefixes=stripped, chunked_blocks=chunked,
        config=dict(config) if config is not None else None, iteration=iteration,
    )


def load_head_state_dicts(path: str | os.PathLike, map_location="cpu",
                          weights_only: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Head state dicts of a checkpoint, e.g. ``{"dino_head": {"mlp.0.weight": ..., ...}}``.

    Args:
        path: checkpoint file (see :func:`read_checkpoint`).
        map_location, weights_only: passed to ``torch.load``.

    Returns:
        head name -> state dict with the ``<name>.`` prefix stripped (empty if no heads).
    """
    return read_checkpoint(path, map_location, weights_only).heads


# ----------------------------------------------------------------------------- architecture
def _resolve_arch(name: str, path: Path) -> str:
    for candidate in (name, f"{name}_3d"):
        if candidate in MODEL_REGISTRY:
            return candidate
    raise CheckpointError(f"{path}: unknown architecture '{name}'. Available: {', '.join(sorted(MODEL_REGISTRY))}")


def backbone_kwargs_from_config(config: Mapping[str, Any], path: str | os.PathLike = "<config>"
                                ) -> tuple[str, dict[str, Any]]:
    """Registry name and overrides of the backbone described by a resolved training config.

    Args:
        config: plain nested dict with a ``student`` section (keys in the module docstring).
        path: file the config came from, for error messages.

    Returns:
        ``(arch, kwargs)`` for :func:`dinov2.models.registry.build_model`.

    Raises:
        CheckpointError: no ``student.arch`` or an unknown one.
    """
    path = Path(path)
    student = config.get("student")
    if not isinstance(student, Mapping) or not student.get("arch"):
        raise CheckpointError(f"{path}: the embedded config has no student.arch; pass arch=... or a model.")
    kwargs = {arg: student[key] for key, arg in CONFIG_KEYS.items() if key in student}
    if "patch_size" in kwargs and not isinstance(kwargs["patch_size"], int):
        kwargs["patch_size"] = tuple(kwargs["patch_size"])
    crops = config.get("crops")
    if isinstance(crops, Mapping) and crops.get("global_crops_size") is not None:
        size = crops["global_crops_size"]
        kwargs["img_size"] = size if isinstance(size, int) else tuple(size)
    return _resolve_arch(str(student["arch"]), path), kwargs


def _swiglu_ratio(hidden: int, dim: int) -> float | None:
    # SwiGLUFFN shrinks the nominal width to 2/3 rounded up to a multiple of 8; find the ratio back.
    for ratio in (4.0, hidden * 1.5 / dim):
        if (int(dim * ratio * 2 / 3) + 7) // 8 * 8 == hidden:
            return ratio
    return None


def _cube_grid(num_patches: int) -> tuple[int, int, int] | None:
    side = round(num_patches ** (1 / 3))
    return (side,) * 3 if side ** 3 == num_patches else None


def infer_backbone_kwargs(backbone: Mapping[str, torch.Tensor], path: str | os.PathLike = "<state dict>",
                          require_heads: bool = True) -> dict[str, Any]:
    """Constructor arguments of :class:`VisionTransformer3D` that fit a backbone state dict.

    embed_dim from ``cls_token``; depth from the largest block index; heads from
    ``KNOWN_NUM_HEADS``; patch size and channels from ``patch_embed.proj.weight``; native grid
    (``img_size``) from the ``pos_embed`` length, which must be a cube; MLP or SwiGLU and the
    hidden ratio from the feed-forward keys; LayerScale, biases and register tokens from
    whether their keys exist.

    Args:
        backbone: flat backbone names (as in :class:`CheckpointContents`).
        path: file name for error messages.
        require_heads: fail for an embed_dim outside ``KNOWN_NUM_HEADS``; when False,
            ``num_heads`` is None for such sizes (the caller names an architecture instead).

    Returns:
        kwargs for ``VisionTransformer3D``.

    Raises:
        CheckpointError: a required tensor is absent or a size is not recognised.
    """
    path = Path(path)
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight")
    absent = [k for k in required if k not in backbone]
    if absent:
        raise CheckpointError(
            f"{path}: cannot infer the architecture, no backbone keys {absent} "
            f"(found: {_preview(sorted(backbone))}). Is this a ViT backbone checkpoint? {_HINT}")
    dim = int(backbone["cls_token"].shape[-1])
    if dim not in KNOWN_NUM_HEADS and require_heads:
        raise CheckpointError(f"{path}: embed_dim {dim} is not a known size {sorted(KNOWN_NUM_HEADS)}, so the "
                              "number of heads is unknown; pass arch=... (a registry name) or a built model.")
    depth = 1 + max(int(m.group(1)) for k in backbone if (m := _FLAT_BLOCK.match(k)))
    proj = backbone["patch_embed.proj.weight"]
    patch = tuple(int(s) for s in proj.shape[2:])
    num_patches = int(backbone["pos_embed"].shape[1]) - 1
    grid = _cube_grid(num_patches)
    if grid is None:
        raise CheckpointError(f"{path}: pos_embed covers {num_patches} patches, not a cube, so the training "
                              "grid is unknown; pass a model built for that grid.")
    if "blocks.0.mlp.w12.weight" in backbone:
        ffn, hidden = "swiglu", int(backbone["blocks.0.mlp.w12.weight"].shape[0]) // 2
        ratio = _swiglu_ratio(hidden, dim)
        if ratio is None:
            raise CheckpointError(f"{path}: SwiGLU hidden width {hidden} fits no mlp_ratio for dim {dim}.")
    elif "blocks.0.mlp.fc1.weight" in backbone:
        ffn, ratio = "mlp", backbone["blocks.0.mlp.fc1.weight"].shape[0] / dim
    else:
        raise CheckpointError(f"{path}: blocks.0 has neither mlp.fc1 (MLP) nor mlp.w12 (SwiGLU) weights.")
    registers = backbone.get("register_tokens")
    return dict(
        img_size=tuple(g * p for g, p in zip(grid, patch)),
        patch_size=patch[0] if len(set(patch)) == 1 else patch,
        in_chans=int(proj.shape[1]), embed_dim=dim, depth=depth, num_heads=KNOWN_NUM_HEADS.get(dim),
        mlp_ratio=ratio, ffn_layer=ffn,
        qkv_bias="blocks.0.attn.qkv.bias" in backbone, proj_bias="blocks.0.attn.proj.bias" in backbone,
        ffn_bias=any(f"blocks.0.mlp.{n}.bias" in backbone for n in ("fc1", "w12")),
        init_values=1e-5 if "blocks.0.ls1.gamma" in backbone else None,
        num_register_tokens=int(registers.shape[1]) if registers is not None else 0,
    )


# ----------------------------------------------------------------------------- adapting tensors
def resize_pos_embed_to_model(pos_embed: torch.Tensor, source_grid: tuple[int, int, int],
                              model: VisionTransformer3D) -> torch.Tensor:
    """Resample a checkpoint's position embedding to ``model``'s native grid.

    Uses the backbone's own :func:`~dinov2.models.vision_transformer.resample_pos_embed` with the
    model's ``interpolate_offset``, so loading equals what the model would compute at run time
    from the original grid.

    Args:
        pos_embed: ``(1, 1 + prod(source_grid), E)``.
        source_grid: ``(h, w, d)`` the checkpoint was trained on.
        model: target model (its ``patch_grid`` and ``interpolate_offset`` are used).

    Returns:
        ``(1, 1 + prod(model.patch_grid), E)`` in the dtype of ``model.pos_embed``.
    """
    if tuple(source_grid) == tuple(model.patch_grid):
        return pos_embed.to(model.pos_embed.dtype)
    return resample_pos_embed(pos_embed, source_grid, model.patch_grid, model.interpolate_offset).to(
        model.pos_embed.dtype)


def _source_grid(contents: CheckpointContents, num_patches: int, model: VisionTransformer3D):
    candidates = []
    if contents.config is not None:
        try:
            _, kw = backbone_kwargs_from_config(contents.config, contents.path)
            patch = model.patch_embed.patch_size
            size = kw.get("img_size")
            if size is not None:
                size = (size,) * 3 if isinstance(size, int) else tuple(size)
                candidates.append(tuple(s // p for s, p in zip(size, patch)))
        except CheckpointError:
            pass  # a config without student.arch still leaves the shape-based candidates below
    candidates += [tuple(model.patch_grid), _cube_grid(num_patches)]
    return next((g for g in candidates if g is not None and math.prod(g) == num_patches), None)


def _adapt(contents: CheckpointContents, model: VisionTransformer3D):
    """Rename-free matching of checkpoint tensors to model parameters; resizes pos_embed."""
    path = contents.path
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ckpt = dict(contents.backbone)
    if not set(ckpt) & set(expected):
        raise CheckpointError(
            f"{path} matches no backbone keys of the model (found: {_preview(sorted(ckpt) or contents.other_keys)}). "
            f"Expected names like cls_token, patch_embed.proj.weight, blocks.0.attn.qkv.weight. {_HINT}")
    resized = {}
    pos = ckpt.get("pos_embed")
    if pos is not None and "pos_embed" in expected and tuple(pos.shape) != expected["pos_embed"]:
        if pos.ndim == 3 and pos.shape[-1] == expected["pos_embed"][-1]:
            grid = _source_grid(contents, int(pos.shape[1]) - 1, model)
            if grid is None:
                raise CheckpointError(f"{path}: pos_embed {list(pos.shape)} covers a grid that cannot be inferred; "
                                      "pass a model whose native grid matches the checkpoint's.")
            ckpt["pos_embed"] = resize_pos_embed_to_model(pos, grid, model)
            resized["pos_embed"] = (tuple(pos.shape), expected["pos_embed"])
    mismatched = [f"{k}: checkpoint {list(v.shape)} vs model {list(expected[k])}"
                  for k, v in ckpt.items() if k in expected and tuple(v.shape) != expected[k]]
    if mismatched:
        raise CheckpointError(f"{path}: {len(mismatched)} tensors do not fit the model: "
                              + "; ".join(mismatched[:20]) + (" ..." if len(mismatched) > 20 else "")
                              + ". Build the model with the checkpoint's architecture (arch, patch size, "
                              "in_chans, ffn_layer) or let the loader build it (model=None).")
    missing = sorted(k for k in expected if k not in ckpt)
    unexpected = sorted(k for k in ckpt if k not in expected)
    return ckpt, missing, unexpected, resized


# ----------------------------------------------------------------------------- public entry points
def _target_device(map_location) -> torch.device:
    if isinstance(map_location, (str, torch.device)):
        return torch.device(map_location)
    return torch.device("cpu")


def _plan_model(contents: CheckpointContents, arch: str | None, img_size
                ) -> tuple[str, str | None, dict[str, Any]]:
    """How to build the model for a file: ``(built_from, registry name or None, kwargs)``."""
    if contents.config is not None and arch is None:
        arch_name, kwargs = backbone_kwargs_from_config(contents.config, contents.path)
        built_from = "config"
    else:
        kwargs = infer_backbone_kwargs(contents.backbone, contents.path, require_heads=arch is None)
        arch_name, built_from = (_resolve_arch(arch, contents.path) if arch else None), "shapes"
        if arch_name:  # the named factory supplies width, depth, heads and MLP ratio
            for key in ("embed_dim", "depth", "num_heads", "mlp_ratio"):
                kwargs.pop(key)
    if img_size is not None:
        kwargs["img_size"] = img_size
    return built_from, arch_name, kwargs


def load_pretrained_backbone(path: str | os.PathLike, model: nn.Module | None = None, arch: str | None = None,
                             img_size: int | tuple[int, int, int] | None = None, strict_backbone: bool = True,
                             map_location="cpu", weights_only: bool = True
                             ) -> tuple[VisionTransformer3D, BackboneLoadReport]:
    """Load backbone weights from a checkpoint into ``model``, or build the model that fits them.

    Args:
        path: checkpoint file in a supported layout (module docstring).
        model: a :class:`VisionTransformer3D` to fill; None builds one from the embedded config,
            else from the tensor shapes.
        arch: registry name to build (``vit_large_3d``): it sets width, depth, heads and MLP
            ratio, everything else is inferred from the tensor shapes (an embedded config is
            then not used). Only with ``model=None``.
        img_size: native input size of the built model (default: the checkpoint's). The
            position embedding is resampled when the grids differ. Only with ``model=None``.
        strict_backbone: fail when backbone parameters are missing from the file or the file
            has backbone tensors the model cannot hold. Heads never count.
        map_location: device of the loaded tensors (and of a built model).
        weights_only: safe ``torch.load`` (default); False only for files you trust.

    Returns:
        ``(model, report)``; the model is the given one (modified in place) or a new one in
        training mode, as after construction.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a checkpoint, no backbone keys, shape mismatches, or (strict)
            missing / unexpected backbone keys. Every message names the file.
        ValueError: ``arch`` / ``img_size`` given together with ``model``.

    Example:
        >>> model, report = load_pretrained_backbone("teacher_checkpoint.pth", img_size=96)
        >>> model.eval().forward_features(torch.randn(1, 1, 96, 96, 96))["x_norm_patchtokens"].shape
        torch.Size([1, 216, 1024])
    """
    if model is not None and (arch is not None or img_size is not None):
        raise ValueError("arch and img_size choose how to build a model; do not pass them with model=...")
    if model is not None and not isinstance(model, VisionTransformer3D):
        raise ValueError(f"model must be a VisionTransformer3D, got {type(model).__name__}")
    contents = read_checkpoint(path, map_location, weights_only)
    built_from, kwargs, factory = "model", {}, None
    if model is None:
        built_from, arch_name, ctor_kwargs = _plan_model(contents, arch, img_size)
        factory = partial(build_model, arch_name) if arch_name else VisionTransformer3D
        kwargs = {"arch": arch_name, **ctor_kwargs} if arch_name else ctor_kwargs
        # Built without initialisation (meta tensors): every value comes from the file next.
        with torch.device("meta"):
            model = factory(**ctor_kwargs)
    state, missing, unexpected, resized = _adapt(contents, model)
    if strict_backbone and (missing or unexpected):
        raise CheckpointError(
            f"{contents.path} does not fit the backbone: missing {_preview(missing) or 'none'}; "
            f"unexpected {_preview(unexpected) or 'none'}. Use a checkpoint of the same architecture, "
            "or pass strict_backbone=False to keep missing parameters at their initial values.")
    state = {k: v for k, v in state.items() if k not in unexpected}
    assign = False
    if factory is not None:
        if missing:  # parameters not in the file need a real initialisation
            model = factory(**ctor_kwargs).to(_target_device(map_location))
        else:
            # Adopt the loaded tensors instead of copying them into fresh memory (ViT-L: 1.2 GB).
            dtypes = {k: v.dtype for k, v in model.state_dict().items()}
            state = {k: v.to(dtype=dtypes[k]) for k, v in state.items()}
            assign = True
    result = model.load_state_dict(state, strict=False, assign=assign)
    if assign and any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise CheckpointError(f"{contents.path}: some model tensors were not filled by the file; please report this.")
    if sorted(result.missing_keys) != missing or result.unexpected_keys:
        raise CheckpointError(f"{contents.path}: internal key accounting disagrees with load_state_dict "
                              f"({result}); please report this.")
    report = BackboneLoadReport(
        path=contents.path, source_format=contents.source_format,
        loaded_keys=sorted(k for k in state if k not in unexpected), missing_keys=missing,
        unexpected_keys=unexpected, resized_keys=resized,
        non_backbone_keys=sorted([f"{h}.{k}" for h, sd in contents.heads.items() for k in sd] + contents.other_keys),
        head_state_dicts=contents.heads, built_from=built_from, model_kwargs=kwargs,
        wrapper_key=contents.wrapper_key, stripped_prefixes=contents.stripped_prefixes,
        chunked_blocks=contents.chunked_blocks, config=contents.config, iteration=contents.iteration,
    )
    (logger.warning if missing or unexpected else logger.info)(report.summary())
    return model, report


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
    name = next((c for c in (str(arch), f"{arch}_3d") if c in MODEL_REGISTRY), None)
    if name is None:
        raise ValueError(f"Unknown architecture '{arch}' ({flag}). Available: {', '.join(sorted(MODEL_REGISTRY))}")
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


def build_model_from_checkpoint(path: str | os.PathLike, img_size: int | tuple[int, int, int] | None = None,
                                map_location="cpu", weights_only: bool = True) -> VisionTransformer3D:
    """The backbone stored in a checkpoint, ready for feature extraction (eval mode).

    Args:
        path: checkpoint file (any supported layout).
        img_size: native input size (default: the checkpoint's).
        map_location: device of the model.
        weights_only: safe loading (default).

    Returns:
        A :class:`VisionTransformer3D` in eval mode with every backbone weight from the file.
    """
    model, _ = load_pretrained_backbone(path, img_size=img_size, map_location=map_location,
                                        weights_only=weights_only)
    return model.eval()
