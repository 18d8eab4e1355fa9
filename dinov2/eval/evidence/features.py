"""Frozen-backbone features of the two tasks (last block, normalised), in float32 batches."""

from __future__ import annotations

import torch
from torch import nn

from .tasks import TaskSplit


@torch.no_grad()
def _forward_batches(model: nn.Module, inputs: torch.Tensor, batch_size: int, device: torch.device,
                     keep) -> torch.Tensor:
    """``keep(forward_features output)`` of every batch, concatenated on the CPU."""
    outputs = []
    for start in range(0, inputs.shape[0], batch_size):
        batch = inputs[start:start + batch_size].to(device=device, dtype=torch.float32)
        outputs.append(keep(model.forward_features(batch)).float().cpu())
    return torch.cat(outputs)


def patch_representation(model: nn.Module, patches: torch.Tensor, batch_size: int = 64,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """CLS token and mean patch token of the last block, concatenated.

    Args:
        model: a :class:`~dinov2.models.vision_transformer.VisionTransformer3D` in eval mode.
        patches: ``(N, 1, S, S, S)``.
        batch_size: patches per forward pass.
        device: where the model is.

    Returns:
        float32 ``(N, 2 * E)`` on the CPU.
    """
    def keep(out: dict) -> torch.Tensor:
        return torch.cat([out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(dim=1)], dim=1)

    return _forward_batches(model, patches, batch_size, torch.device(device), keep)


def token_representation(model: nn.Module, windows: torch.Tensor, tokens: torch.Tensor, batch_size: int = 16,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """The last block's normalised patch token of every labelled token.

    Args:
        model: backbone in eval mode.
        windows: ``(M, 1, W, W, W)``.
        tokens: ``(T, 2)`` ``(window index, token index)``; token indices in the backbone's order
            (``(h, w, d)`` flattened with ``d`` fastest, as the windows' axes ``(H, W, D)``).
        batch_size: windows per forward pass.
        device: where the model is.

    Returns:
        float32 ``(T, E)`` on the CPU.
    """
    per_window = _forward_batches(model, windows, batch_size, torch.device(device),
                                  lambda out: out["x_norm_patchtokens"])  # (M, n_tokens, E)
    return per_window[tokens[:, 0], tokens[:, 1]]


def network_features(model: nn.Module, split: TaskSplit, batch_size: int, device: torch.device | str) -> torch.Tensor:
    """Features of every labelled item of a split: ``(T, 2E)`` (patch task) or ``(T, E)`` (dense)."""
    if split.tokens is None:
        return patch_representation(model, split.inputs, batch_size, device)
    return token_representation(model, split.inputs, split.tokens, max(1, batch_size // 4), device)
