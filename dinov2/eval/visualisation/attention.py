"""CLS-to-patch attention of the last block, as per-head maps on the token grid."""

from __future__ import annotations

import torch


@torch.no_grad()
def last_block_attention(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Where the CLS token looks, per head, in the LAST block.

    Args:
        model: a :class:`dinov2.models.VisionTransformer3D`.
        x: ``(B, C, H, W, D)`` input, each side a multiple of the patch size.

    Returns:
        ``(B, heads, h, w, d)``: the CLS row of the last block's attention restricted to patch
        tokens, each head summing to 1 over the ``h * w * d`` patches (register tokens excluded).
    """
    grid = model.patch_embed.grid_size(x.shape[2:])
    attention = model.get_last_self_attention(x)  # (B, heads, N), renormalised over patches
    return attention.reshape(x.shape[0], attention.shape[1], *grid)


def display_scale(maps: torch.Tensor, mask: torch.Tensor | None = None, low: float = 1.0,
                  high: float = 99.5) -> torch.Tensor:
    """Stretch each head's map to ``[0, 1]`` between its ``low`` and ``high`` percentiles
    (taken inside ``mask`` if given).

    Attention sums to 1 over thousands of patches, so raw values are tiny and differ between
    heads; per-head percentiles make each head's focus visible on its own, whether it is peaked
    (a trained model) or nearly flat (an untrained one).

    Args:
        maps: ``(heads, X, Y, Z)`` non-negative maps.
        mask: optional bool ``(X, Y, Z)`` region whose values set the scale.
        low, high: percentiles mapped to 0 and 1.

    Returns:
        ``(heads, X, Y, Z)`` in ``[0, 1]``.
    """
    flat = maps.flatten(1)
    if mask is not None:
        flat = flat[:, mask.flatten().bool()]
    if flat.shape[1] == 0:
        raise ValueError("Empty mask: nothing to scale the attention maps on.")
    # quantile is limited to 16M elements; a strided sample estimates a percentile just as well
    step = max(1, flat.shape[1] // 2_000_000)
    if not 0 <= low < high <= 100:
        raise ValueError(f"Need 0 <= low < high <= 100, got {low}, {high}")
    sample = flat[:, ::step].float()
    bottom = torch.quantile(sample, low / 100.0, dim=1).view(-1, 1, 1, 1)
    top = torch.quantile(sample, high / 100.0, dim=1).view(-1, 1, 1, 1)
    return ((maps - bottom) / (top - bottom).clamp_min(1e-12)).clamp(0.0, 1.0)
