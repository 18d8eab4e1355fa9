"""Frozen-backbone features of the two tasks (normalised block outputs), in float32 batches.

A representation is read from the last ``n`` blocks (each through the backbone's final
LayerNorm, as DINOv2's linear evaluation reads them) and concatenated, earliest block first.
:func:`network_features` computes the most blocks asked for once; :func:`last_blocks` cuts the
fewer-block representations out of it (they are its last columns).
"""

from __future__ import annotations

import torch
from torch import nn

from .tasks import TaskSplit


def usable_blocks(model: nn.Module, blocks: int) -> int:
    """``blocks`` capped at the backbone's depth (a 2-block model has no "last 4 blocks")."""
    return max(1, min(int(blocks), len(model.blocks)))


@torch.no_grad()
def _forward_batches(model: nn.Module, inputs: torch.Tensor, batch_size: int, device: torch.device,
                     blocks: int, keep) -> torch.Tensor:
    """``keep([(patch_tokens, cls), ...] of the last blocks)`` of every batch, concatenated on the CPU."""
    outputs = []
    n = usable_blocks(model, blocks)
    for start in range(0, inputs.shape[0], batch_size):
        batch = inputs[start:start + batch_size].to(device=device, dtype=torch.float32)
        layers = model.get_intermediate_layers(batch, n=n, return_class_token=True)
        outputs.append(keep(layers).float().cpu())
    return torch.cat(outputs)


def patch_representation(model: nn.Module, patches: torch.Tensor, batch_size: int = 64,
                         device: torch.device | str = "cpu", blocks: int = 1) -> torch.Tensor:
    """CLS token and mean patch token of each of the last ``blocks`` blocks, concatenated.

    Args:
        model: a :class:`~dinov2.models.vision_transformer.VisionTransformer3D` in eval mode.
        patches: ``(N, 1, S, S, S)``.
        batch_size: patches per forward pass.
        device: where the model is.
        blocks: how many of the last blocks (capped at the depth).

    Returns:
        float32 ``(N, 2 * E * blocks)`` on the CPU: ``[cls, mean]`` per block, earliest block first.
    """
    def keep(layers) -> torch.Tensor:
        return torch.cat([torch.cat([cls, tokens.mean(dim=1)], dim=1) for tokens, cls in layers], dim=1)

    return _forward_batches(model, patches, batch_size, torch.device(device), blocks, keep)


def token_representation(model: nn.Module, windows: torch.Tensor, tokens: torch.Tensor, batch_size: int = 16,
                         device: torch.device | str = "cpu", blocks: int = 1) -> torch.Tensor:
    """The normalised patch token of every labelled token in each of the last ``blocks`` blocks.

    Args:
        model: backbone in eval mode.
        windows: ``(M, 1, W, W, W)``.
        tokens: ``(T, 2)`` ``(window index, token index)``; token indices in the backbone's order
            (``(h, w, d)`` flattened with ``d`` fastest, as the windows' axes ``(H, W, D)``).
        batch_size: windows per forward pass.
        device: where the model is.
        blocks: how many of the last blocks (capped at the depth).

    Returns:
        float32 ``(T, E * blocks)`` on the CPU, earliest block first.
    """
    per_window = _forward_batches(model, windows, batch_size, torch.device(device), blocks,
                                  lambda layers: torch.cat([t for t, _ in layers], dim=2))  # (M, n_tokens, E*blocks)
    return per_window[tokens[:, 0], tokens[:, 1]]


def network_features(model: nn.Module, split: TaskSplit, batch_size: int, device: torch.device | str,
                     blocks: int = 1) -> torch.Tensor:
    """Features of every labelled item of a split: ``(T, 2E * blocks)`` (patch task) or ``(T, E * blocks)`` (dense)."""
    if split.tokens is None:
        return patch_representation(model, split.inputs, batch_size, device, blocks)
    return token_representation(model, split.inputs, split.tokens, max(1, batch_size // 4), device, blocks)


def last_blocks(features: torch.Tensor, computed: int, wanted: int) -> torch.Tensor:
    """The ``wanted``-block representation inside one computed from ``computed`` blocks.

    Args:
        features: ``(T, computed * F)`` from :func:`network_features` (``F`` columns per block).
        computed: blocks ``features`` was computed from; wanted: at most ``computed``.

    Returns:
        ``(T, wanted * F)``: the last ``wanted`` blocks' columns.
    """
    per_block = features.shape[1] // computed
    return features[:, (computed - wanted) * per_block:]
