"""Load backbone weights from a checkpoint of any supported layout, with a report of what happened.

:func:`load_pretrained_backbone` fills a given :class:`~dinov2.models.vision_transformer.VisionTransformer3D`
or builds the one that fits the file: from the embedded config of our teacher checkpoint (keys
read by :func:`dinov2.models.build.backbone_kwargs_from_config`), else from the tensor shapes
(:func:`infer_backbone_kwargs`, e.g. for the published 3DINO-ViT teacher). The layouts accepted
are listed in :mod:`dinov2.checkpoints.layouts`. A position embedding trained on another grid
is resampled to the model's.

``student.drop_path_rate`` / ``drop_path_uniform`` are deliberately not read: the file holds
the EMA teacher, which trains without stochastic depth, so the rebuilt backbone has none
(finetuning code that wants it sets ``block.drop_path`` itself).

Heads (``dino_head.*``, ``ibot_head.*``) and any other non-backbone tensors are never
"unexpected": they are listed separately and the head state dicts are returned, prefix
stripped, in the report.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dinov2.models.build import BackboneConfigError, backbone_kwargs_from_config, resolve_arch
from dinov2.models.registry import build_model
from dinov2.models.vision_transformer import VisionTransformer3D, resample_pos_embed

from .errors import CheckpointError
from .layouts import FLAT_BLOCK, HINT, CheckpointContents, preview_keys, read_checkpoint

logger = logging.getLogger(__name__)

# embed_dim -> num_heads of the sizes our registry builds (head_dim 64; 16 for vit_tiny_3d).
KNOWN_NUM_HEADS = {64: 4, 384: 6, 768: 12, 1024: 16, 1536: 24}


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
            parts.append(f"Missing: {preview_keys(self.missing_keys)}.")
        if self.unexpected_keys:
            parts.append(f"Unexpected: {preview_keys(self.unexpected_keys)}.")
        if self.non_backbone_keys:
            heads = ", ".join(f"{k} ({len(v)} tensors)" for k, v in self.head_state_dicts.items())
            parts.append(f"Ignored {len(self.non_backbone_keys)} non-backbone tensors"
                         + (f" (heads: {heads})" if heads else "") + ".")
        return " ".join(parts)


# ----------------------------------------------------------------------------- architecture
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
            f"(found: {preview_keys(sorted(backbone))}). Is this a ViT backbone checkpoint? {HINT}")
    dim = int(backbone["cls_token"].shape[-1])
    if dim not in KNOWN_NUM_HEADS and require_heads:
        raise CheckpointError(f"{path}: embed_dim {dim} is not a known size {sorted(KNOWN_NUM_HEADS)}, so the "
                              "number of heads is unknown; pass arch=... (a registry name) or a built model.")
    depth = 1 + max(int(m.group(1)) for k in backbone if (m := FLAT_BLOCK.match(k)))
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
        except BackboneConfigError:
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
            f"{path} matches no backbone keys of the model (found: {preview_keys(sorted(ckpt) or contents.other_keys)}). "
            f"Expected names like cls_token, patch_embed.proj.weight, blocks.0.attn.qkv.weight. {HINT}")
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
    try:
        if contents.config is not None and arch is None:
            arch_name, kwargs = backbone_kwargs_from_config(contents.config, contents.path)
            built_from = "config"
        else:
            kwargs = infer_backbone_kwargs(contents.backbone, contents.path, require_heads=arch is None)
            arch_name, built_from = (resolve_arch(arch, contents.path) if arch else None), "shapes"
            if arch_name:  # the named factory supplies width, depth, heads and MLP ratio
                for key in ("embed_dim", "depth", "num_heads", "mlp_ratio"):
                    kwargs.pop(key)
    except BackboneConfigError as exc:  # the file does not describe a backbone we can build
        raise CheckpointError(str(exc)) from exc
    if img_size is not None:
        kwargs["img_size"] = img_size
    return built_from, arch_name, kwargs


def load_pretrained_backbone(path: str | os.PathLike, model: nn.Module | None = None, arch: str | None = None,
                             img_size: int | tuple[int, int, int] | None = None, strict_backbone: bool = True,
                             map_location="cpu", weights_only: bool = True
                             ) -> tuple[VisionTransformer3D, BackboneLoadReport]:
    """Load backbone weights from a checkpoint into ``model``, or build the model that fits them.

    Args:
        path: checkpoint file in a supported layout (:mod:`dinov2.checkpoints.layouts`).
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
        model, factory, built_from, kwargs = _meta_model(contents, arch, img_size)
    state, missing, unexpected, resized = _adapt(contents, model)
    if strict_backbone and (missing or unexpected):
        raise CheckpointError(
            f"{contents.path} does not fit the backbone: missing {preview_keys(missing) or 'none'}; "
            f"unexpected {preview_keys(unexpected) or 'none'}. Use a checkpoint of the same architecture, "
            "or pass strict_backbone=False to keep missing parameters at their initial values.")
    state = {k: v for k, v in state.items() if k not in unexpected}
    model = _fill_model(model, factory, state, missing, map_location, contents.path)
    report = _load_report(contents, state, missing, unexpected, resized, built_from, kwargs)
    (logger.warning if missing or unexpected else logger.info)(report.summary())
    return model, report


def _meta_model(contents: CheckpointContents, arch: str | None, img_size
                ) -> tuple[VisionTransformer3D, Callable[[], VisionTransformer3D], str, dict[str, Any]]:
    """Builds the backbone that fits the file on the meta device: no memory, no initialisation.

    Every value normally comes from the file next, so initialising would be wasted work.

    Returns:
        ``(model, factory, built_from, model_kwargs)``: the meta model, a callable building
        the same model with real (initialised) tensors, ``"config"`` or ``"shapes"``, and the
        arguments for the report (with ``arch`` when a registry name was used).
    """
    built_from, arch_name, ctor_kwargs = _plan_model(contents, arch, img_size)
    factory = partial(build_model, arch_name) if arch_name else VisionTransformer3D
    kwargs = {"arch": arch_name, **ctor_kwargs} if arch_name else ctor_kwargs
    with torch.device("meta"):
        model = factory(**ctor_kwargs)
    return model, partial(factory, **ctor_kwargs), built_from, kwargs


def _fill_model(model: VisionTransformer3D, factory: Callable[[], VisionTransformer3D] | None,
                state: dict[str, torch.Tensor], missing: list[str], map_location, path: Path
                ) -> VisionTransformer3D:
    """Loads ``state`` (backbone tensors, already fitted to the model's shapes) into the model.

    Args:
        model: the given model, or the meta model when ``factory`` is not None.
        factory: builds the model with real tensors (``None`` when the model was given).
        state: name -> tensor of the model's shape, only names the model holds.
        missing: sorted model parameter names the file lacks.
        map_location: device of a model built here.
        path: the file, for error messages.

    Returns:
        The model with the file's tensors: the given one, the meta model with the loaded
        tensors adopted, or a freshly initialised one when parameters are missing.
    """
    assign = False
    if factory is not None:
        if missing:  # parameters not in the file need a real initialisation
            model = factory().to(_target_device(map_location))
        else:
            # Adopt the loaded tensors instead of copying them into fresh memory (ViT-L: 1.2 GB).
            dtypes = {k: v.dtype for k, v in model.state_dict().items()}
            state = {k: v.to(dtype=dtypes[k]) for k, v in state.items()}
            assign = True
    result = model.load_state_dict(state, strict=False, assign=assign)
    if assign and any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise CheckpointError(f"{path}: some model tensors were not filled by the file; please report this.")
    if sorted(result.missing_keys) != missing or result.unexpected_keys:
        raise CheckpointError(f"{path}: internal key accounting disagrees with load_state_dict "
                              f"({result}); please report this.")
    return model


def _load_report(contents: CheckpointContents, state: Mapping[str, torch.Tensor], missing: list[str],
                 unexpected: list[str], resized: dict, built_from: str, kwargs: dict[str, Any]
                 ) -> BackboneLoadReport:
    """The :class:`BackboneLoadReport` of a finished load (``state``: the tensors loaded, by name)."""
    return BackboneLoadReport(
        path=contents.path, source_format=contents.source_format,
        loaded_keys=sorted(k for k in state if k not in unexpected), missing_keys=missing,
        unexpected_keys=unexpected, resized_keys=resized,
        non_backbone_keys=sorted([f"{h}.{k}" for h, sd in contents.heads.items() for k in sd] + contents.other_keys),
        head_state_dicts=contents.heads, built_from=built_from, model_kwargs=kwargs,
        wrapper_key=contents.wrapper_key, stripped_prefixes=contents.stripped_prefixes,
        chunked_blocks=contents.chunked_blocks, config=contents.config, iteration=contents.iteration,
    )


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
