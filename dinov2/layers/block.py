"""Pre-norm transformer block: x + LS1(Attn(LN(x))), then x + LS2(MLP(LN(x)))."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .attention import Attention
from .drop_path import drop_path_scale, kept_subset
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
        # True: residual branches run on the kept samples only (less compute, same expectation);
        # False: every sample runs and dropped ones are multiplied by 0 (kept for benchmarks/tests).
        self.subset_drop_path = True

    def _kept_subset(self, x: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        if not self.subset_drop_path:
            return None
        return kept_subset(x.shape[0], self.drop_path, self.training, x.device)

    def _attn_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def _mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def _residual(self, x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``x + branch(x)`` under stochastic depth: on a kept subset when that drops whole samples."""
        subset = self._kept_subset(x)
        if subset is not None:
            kept, scale = subset
            return x.index_add(0, kept, branch(x[kept]).to(x.dtype), alpha=scale)
        scale = drop_path_scale(x.shape[0], self.drop_path, self.training, x)
        if scale is None:
            return x + branch(x)
        return x + branch(x) * scale.view(-1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._residual(x, self._attn_branch)
        return self._residual(x, self._mlp_branch)

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`forward` (eval mode) but also returns attention weights ``(B, heads, N, N)``."""
        y, attn = self.attn.forward_with_weights(self.norm1(x))
        x = x + self.ls1(y)
        return x + self.ls2(self.mlp(self.norm2(x))), attn

    def forward_list(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Process crop groups of different sizes: token-wise layers (norms, projections, MLP)
        run once on all tokens concatenated, so matrix products are large; attention runs once
        per group. Mathematically equal to calling :meth:`forward` on each group (in training,
        each group draws its own stochastic-depth subset, as :meth:`forward` would).
        """
        if len(xs) == 1:
            return [self.forward(xs[0])]
        xs = self._residual_list(xs, self._attn_branch_list)
        return self._residual_list(xs, lambda flat, shapes: self._mlp_branch(flat))

    def _attn_branch_list(self, flat: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        """Attention branch of groups whose ``(B_i * N_i, E)`` tokens are concatenated in ``flat``."""
        qkv = self.attn.qkv(self.norm1(flat)).split([b * n for b, n in shapes])
        attended = torch.cat([
            self.attn.attend(q.view(b, n, -1)).reshape(b * n, -1) for q, (b, n) in zip(qkv, shapes)
        ])
        return self.ls1(self.attn.proj_drop(self.attn.proj(attended)))

    def _residual_list(self, xs: list[torch.Tensor], branch) -> list[torch.Tensor]:
        """``x_i + branch(x_i)`` for every group, the branch run once on the kept samples of all groups.

        ``branch(flat, shapes)`` maps the concatenated ``(sum B_i * N_i, E)`` tokens of groups
        with ``shapes = [(B_i, N_i)]`` to the same shape. A group keeps a subset when that drops
        whole samples (:func:`~.drop_path.kept_subset`), else it runs whole with per-sample factors.
        """
        subsets = [self._kept_subset(x) for x in xs]
        inputs = [x if sub is None else x[sub[0]] for x, sub in zip(xs, subsets)]
        shapes = [tuple(t.shape[:2]) for t in inputs]
        flat = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs])
        pieces = branch(flat, shapes).split([b * n for b, n in shapes])
        out = []
        for x, sub, piece, (b, n) in zip(xs, subsets, pieces, shapes):
            piece = piece.view(b, n, -1).to(x.dtype)
            if sub is not None:
                out.append(x.index_add(0, sub[0], piece, alpha=sub[1]))
                continue
            scale = drop_path_scale(b, self.drop_path, self.training, x)
            out.append(x + (piece if scale is None else piece * scale.view(-1, 1, 1)))
        return out
