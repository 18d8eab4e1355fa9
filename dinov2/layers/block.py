"""Pre-norm transformer block: x + LS1(Attn(LN(x))), then x + LS2(MLP(LN(x)))."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .attention import Attention
from .drop_path import drop_path_scale
from .layer_scale import LayerScale
from .mlp import Mlp


class Block(nn.Module):
    """One ViT block with LayerScale and stochastic depth.

    Parameter names (``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1.gamma``, ``norm2``,
    ``mlp.fc1``, ``mlp.fc2``, ``ls2.gamma``) match the published checkpoints.

    Args:
        dim, num_heads: width and heads.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        drop_path: stochastic-depth rate of this block.
        init_values: LayerScale init; ``None`` or 0 disables LayerScale.
        ffn_layer: ``Mlp`` or ``SwiGLUFFN`` class.

    Shapes: ``(B, N, dim)`` → ``(B, N, dim)``; :meth:`forward_list` takes a list of such tensors
    with different ``B`` and ``N`` (crop groups) and returns a list.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, init_values: float | None = None,
                 norm_layer: Callable[[int], nn.Module] | None = None, ffn_layer: type[nn.Module] = Mlp):
        super().__init__()
        norm_layer = norm_layer or (lambda d: nn.LayerNorm(d, eps=1e-6))
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
                              attn_drop=attn_drop, proj_drop=drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), bias=ffn_bias, drop=drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = float(drop_path)

    def _residual(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        scale = drop_path_scale(x.shape[0], self.drop_path, self.training, x)
        if scale is None:
            return x + branch
        return x + branch * scale.view(-1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._residual(x, self.ls1(self.attn(self.norm1(x))))
        return self._residual(x, self.ls2(self.mlp(self.norm2(x))))

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`forward` (eval mode) but also returns attention weights ``(B, heads, N, N)``."""
        y, attn = self.attn.forward_with_weights(self.norm1(x))
        x = x + self.ls1(y)
        return x + self.ls2(self.mlp(self.norm2(x))), attn

    def forward_list(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Process crop groups of different sizes: token-wise layers (norms, projections, MLP)
        run once on all tokens concatenated, so matrix products are large; attention runs once
        per group. Mathematically equal to calling :meth:`forward` on each group.
        """
        if len(xs) == 1:
            return [self.forward(xs[0])]
        shapes = [x.shape[:2] for x in xs]
        counts = [b * n for b, n in shapes]
        flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
        qkv = self.attn.qkv(self.norm1(flat)).split(counts)
        attended = torch.cat([
            self.attn.attend(q.view(b, n, -1)).reshape(b * n, -1) for q, (b, n) in zip(qkv, shapes)
        ])
        flat = self._residual_flat(flat, self.ls1(self.attn.proj_drop(self.attn.proj(attended))), shapes)
        flat = self._residual_flat(flat, self.ls2(self.mlp(self.norm2(flat))), shapes)
        return [t.view(b, n, -1) for t, (b, n) in zip(flat.split(counts), shapes)]

    def _residual_flat(self, flat: torch.Tensor, branch: torch.Tensor, shapes) -> torch.Tensor:
        if not self.training or self.drop_path <= 0.0:
            return flat + branch
        # Stochastic depth is per sample: expand each group's per-sample factor to its tokens.
        scales = [
            drop_path_scale(b, self.drop_path, True, flat).repeat_interleave(n) for b, n in shapes
        ]
        return flat + branch * torch.cat(scales).unsqueeze(-1)
