"""Optimizer parameter groups: layer-wise LR decay, weight-decay exclusions, last-layer flag.

Parameter names follow the backbone convention (with or without the ``backbone.`` prefix):

=================================================================  ==============
name                                                               layer id
=================================================================  ==============
``cls_token``, ``pos_embed``, ``mask_token``, ``register_tokens``,  0
``patch_embed.*``
``blocks.<i>.*`` (or chunked ``blocks.<chunk>.<i>.*``)              i + 1
``norm.*``, anything else in the backbone, every non-backbone       num_layers + 1
parameter (``dino_head.*``, ``ibot_head.*``)
=================================================================  ==============

LR multiplier = ``lr_decay_rate ** (num_layers + 1 - layer_id)`` (1 for the heads), times
``patch_embed_lr_mult`` for the patch embedding. Weight decay is switched off
(``wd_multiplier = 0``) for biases, every 1-D parameter (norm weights, LayerScale ``gamma``)
and, unless ``decay_tokens`` is set, the learned tokens / position embedding: these are offsets
and tables rather than weights, and a decay that grows to 0.4 pulls the position table towards
zero (timm and iBOT exclude them). The published 3DINO recipe decays them, so the packaged
ViT-L recipe does too (``optim.token_weight_decay``). ``last_layer`` parameters (the prototypes) are flagged so the trainer
can hold their LR at 0 during the first epoch.
"""

from __future__ import annotations

from typing import Any

from torch import nn, optim

BACKBONE_PREFIX = "backbone."
TOKEN_NAMES = ("cls_token", "pos_embed", "mask_token", "register_tokens")


def _block_index(relative_name: str) -> int | None:
    """Global block index of ``blocks.<i>.*`` or chunked ``blocks.<chunk>.<i>.*``; None otherwise."""
    parts = relative_name.split(".")
    if parts[0] != "blocks" or len(parts) < 2 or not parts[1].isdigit():
        return None
    # Chunked storage (published checkpoint): blocks.<chunk>.<global index>.<param>.
    if len(parts) > 2 and parts[2].isdigit():
        return int(parts[2])
    return int(parts[1])


def _backbone_name(name: str, prefixed_model: bool) -> str | None:
    """Name inside the backbone, or None for a parameter outside it (a head)."""
    if not prefixed_model:
        return name
    return name[len(BACKBONE_PREFIX) :] if name.startswith(BACKBONE_PREFIX) else None


def layer_id(name: str, num_layers: int, prefixed_model: bool = True) -> int:
    """Layer id (0 .. num_layers + 1) of one parameter name, see the module docstring.

    Args:
        name: parameter name as given by ``named_parameters()``.
        num_layers: number of transformer blocks.
        prefixed_model: True when backbone parameters are named ``backbone.*`` (the
            meta-architecture); False for a bare backbone.
    """
    relative = _backbone_name(name, prefixed_model)
    if relative is None:
        return num_layers + 1
    first = relative.split(".")[0]
    if first in TOKEN_NAMES or first == "patch_embed":
        return 0
    block = _block_index(relative)
    if block is not None:
        return block + 1
    return num_layers + 1


def _skips_weight_decay(name: str, ndim: int, relative: str | None, decay_tokens: bool) -> bool:
    last = name.split(".")[-1]
    is_token = relative is not None and relative.split(".")[0] in TOKEN_NAMES
    return last == "bias" or ndim <= 1 or last == "gamma" or (is_token and not decay_tokens)


def get_param_groups(
    model: nn.Module,
    lr_decay_rate: float = 0.9,
    patch_embed_lr_mult: float = 0.2,
    num_layers: int | None = None,
    decay_tokens: bool = False,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with LR / weight-decay multipliers.

    Parameters with ``requires_grad=False`` (e.g. a frozen ``last_layer.weight_g``) are left
    out. Parameters that share ``(lr_multiplier, wd_multiplier, is_last_layer)`` are fused into
    one group, so a ViT-L gives a few dozen groups, not hundreds.

    Args:
        model: the student (``backbone.*``, ``dino_head.*``, ``ibot_head.*``) or a bare backbone.
        lr_decay_rate: layer-wise decay in (0, 1]; 1 disables it.
        patch_embed_lr_mult: extra LR factor for ``patch_embed.*``.
        num_layers: number of blocks; inferred as (largest block index + 1) when None.
        decay_tokens: apply weight decay to ``cls_token``, ``pos_embed``, ``mask_token`` and
            ``register_tokens`` too, as the published 3DINO recipe does (``optim.token_weight_decay``).

    Returns:
        A list of dicts with keys ``params`` (list of tensors), ``names`` (their names),
        ``lr_multiplier``, ``wd_multiplier`` (0 or 1) and ``is_last_layer``; pass it to
        ``torch.optim.AdamW`` and drive it with :func:`apply_optim_scheduler`.
    """
    _check_multipliers(lr_decay_rate, patch_embed_lr_mult)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(
            f"get_param_groups: {type(model).__name__} has no trainable parameter "
            "(dinov2/optim/param_groups.py); pass the student, not the frozen teacher."
        )
    prefixed_model = any(n.startswith(BACKBONE_PREFIX) for n, _ in named)
    num_layers = _resolve_num_layers([n for n, _ in named], prefixed_model, num_layers)
    keys = [
        _group_key(name, param.ndim, num_layers, prefixed_model, lr_decay_rate, patch_embed_lr_mult, decay_tokens)
        for name, param in named
    ]
    return _merge_groups(named, keys)


def _check_multipliers(lr_decay_rate: float, patch_embed_lr_mult: float) -> None:
    """Raises ValueError unless ``lr_decay_rate`` lies in (0, 1] and ``patch_embed_lr_mult`` >= 0."""
    if not 0.0 < lr_decay_rate <= 1.0:
        raise ValueError(
            f"get_param_groups: lr_decay_rate must lie in (0, 1], got {lr_decay_rate} "
            "(dinov2/optim/param_groups.py); check optim.layerwise_decay."
        )
    # Written as "not >=" so that NaN fails too.
    if not patch_embed_lr_mult >= 0.0:
        raise ValueError(
            f"get_param_groups: patch_embed_lr_mult must be >= 0, got {patch_embed_lr_mult} "
            "(dinov2/optim/param_groups.py); check optim.patch_embed_lr_mult."
        )


def _resolve_num_layers(names: list[str], prefixed_model: bool, num_layers: int | None) -> int:
    """``num_layers``, or (largest block index + 1) of ``names`` when None; checked against the blocks present."""
    block_ids = [
        b
        for n in names
        if (rel := _backbone_name(n, prefixed_model)) is not None and (b := _block_index(rel)) is not None
    ]
    deepest = max(block_ids) + 1 if block_ids else 0
    if num_layers is None:
        return deepest
    if num_layers < deepest:
        raise ValueError(
            f"get_param_groups: num_layers={num_layers} but the model has block index {deepest - 1} "
            "(dinov2/optim/param_groups.py); leave num_layers=None to infer it."
        )
    return num_layers


def _group_key(
    name: str,
    ndim: int,
    num_layers: int,
    prefixed_model: bool,
    lr_decay_rate: float,
    patch_embed_lr_mult: float,
    decay_tokens: bool,
) -> tuple[float, float, bool]:
    """The ``(lr_multiplier, wd_multiplier, is_last_layer)`` of one parameter (``ndim``: its number of dims)."""
    relative = _backbone_name(name, prefixed_model)
    lr_mult = lr_decay_rate ** (num_layers + 1 - layer_id(name, num_layers, prefixed_model))
    if relative is not None and relative.startswith("patch_embed."):
        lr_mult *= patch_embed_lr_mult
    wd_mult = 0.0 if _skips_weight_decay(name, ndim, relative, decay_tokens) else 1.0
    return lr_mult, wd_mult, "last_layer" in name


def _merge_groups(
    named: list[tuple[str, nn.Parameter]], keys: list[tuple[float, float, bool]]
) -> list[dict[str, Any]]:
    """One group per distinct key, in order of first appearance, holding its parameters in model order."""
    groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
    for (name, param), key in zip(named, keys):
        lr_mult, wd_mult, is_last_layer = key
        group = groups.setdefault(
            key,
            {
                "params": [],
                "names": [],
                "lr_multiplier": lr_mult,
                "wd_multiplier": wd_mult,
                "is_last_layer": is_last_layer,
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def apply_optim_scheduler(optimizer: optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Write this iteration's LR and weight decay into every group.

    Each group gets ``lr = (last_layer_lr if is_last_layer else lr) * lr_multiplier`` and
    ``weight_decay = wd * wd_multiplier``.

    Args:
        optimizer: built from :func:`get_param_groups` (groups carry the multipliers).
        lr: scheduled LR of this iteration.
        wd: scheduled weight decay of this iteration.
        last_layer_lr: scheduled LR of the prototype layers (0 while they are frozen).
    """
    for index, group in enumerate(optimizer.param_groups):
        missing = [k for k in ("lr_multiplier", "wd_multiplier", "is_last_layer") if k not in group]
        if missing:
            raise KeyError(
                f"apply_optim_scheduler: param group {index} lacks {missing} (dinov2/optim/param_groups.py); "
                "build the optimizer from get_param_groups(model)."
            )
        base = last_layer_lr if group["is_last_layer"] else lr
        group["lr"] = base * group["lr_multiplier"]
        group["weight_decay"] = wd * group["wd_multiplier"]
