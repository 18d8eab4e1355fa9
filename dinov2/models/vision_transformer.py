"""The 3D Vision Transformer backbone (DINOv2-style API, MONAI axis order).

Input ``(B, C, H, W, D)``; tokens are the Conv3d patch grid ``(h, w, d)`` flattened with ``d``
fastest, preceded by the CLS token and optional register tokens.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import Block, Mlp, PatchEmbed3D, SwiGLUFFN
from ..layers.patch_embed import to_3tuple

FFN_LAYERS = {"mlp": Mlp, "swiglu": SwiGLUFFN, "swiglufused": SwiGLUFFN}


def resample_pos_embed(pos_embed: torch.Tensor, src_grid: Sequence[int], dst_grid: Sequence[int],
                       interpolate_offset: float = 0.0) -> torch.Tensor:
    """Resample a learned position embedding from one token grid to another, trilinearly.

    Args:
        pos_embed: ``(1, 1 + h*w*d, E)``: the CLS entry first, then the patch grid in
            (H, W, D) order with D fastest.
        src_grid: ``(h, w, d)`` of ``pos_embed``.
        dst_grid: target ``(h', w', d')``.
        interpolate_offset: if non-zero, the scale factor is ``(dst + offset) / src`` per axis
            (DINOv2's convention); 0 resamples to the exact target size.

    Returns:
        float32 ``(1, 1 + h'*w'*d', E)``; the CLS entry is copied unchanged.
    """
    src_grid, dst_grid = tuple(src_grid), tuple(dst_grid)
    dim = pos_embed.shape[-1]
    if pos_embed.shape[1] != 1 + math.prod(src_grid):
        raise ValueError(f"pos_embed has {pos_embed.shape[1]} entries, expected 1 + prod{src_grid}")
    cls_pos, patch_pos = pos_embed[:, :1].float(), pos_embed[:, 1:].float()
    patch_pos = patch_pos.reshape(1, *src_grid, dim).permute(0, 4, 1, 2, 3)
    if interpolate_offset:
        scale = tuple((g + interpolate_offset) / n for g, n in zip(dst_grid, src_grid))
        patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="trilinear", align_corners=False)
    else:
        patch_pos = F.interpolate(patch_pos, size=dst_grid, mode="trilinear", align_corners=False)
    if tuple(patch_pos.shape[2:]) != dst_grid:  # guard against float rounding of sizes
        raise RuntimeError(f"Position-embedding interpolation produced {tuple(patch_pos.shape[2:])}, wanted {dst_grid}")
    patch_pos = patch_pos.permute(0, 2, 3, 4, 1).reshape(1, -1, dim)
    return torch.cat([cls_pos, patch_pos], dim=1)


class VisionTransformer3D(nn.Module):
    """3D ViT with learned position embedding interpolated to any grid, mask token, LayerScale.

    Args:
        img_size: native input size; the learned position embedding covers ``img_size/patch``
            per axis and is interpolated trilinearly for other grids (anisotropic too).
        patch_size: cubic patch side.
        in_chans: input channels.
        embed_dim, depth, num_heads, mlp_ratio: transformer shape.
        drop_path_rate: stochastic depth of the last block (linear ramp from 0 when
            ``drop_path_uniform`` is False, else the same for all blocks).
        init_values: LayerScale init (None disables LayerScale).
        ffn_layer: ``"mlp"`` (exact GELU) or ``"swiglu"``.
        num_register_tokens: extra learned tokens after CLS (0 = off).
        interpolate_offset: added to the native grid size when computing the trilinear scale
            factor (DINOv2 convention, 0.1, which avoids floating-point size rounding); 0 uses
            the exact target size instead.

    Example:
        >>> model = vit_small_3d(img_size=96)
        >>> out = model.forward_features(torch.randn(2, 1, 96, 96, 64))
        >>> out["x_norm_patchtokens"].shape   # 6*6*4 tokens
        torch.Size([2, 144, 384])
    """

    def __init__(self, img_size: int | Sequence[int] = 96, patch_size: int = 16, in_chans: int = 1,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, proj_bias: bool = True, ffn_bias: bool = True,
                 drop_path_rate: float = 0.0, drop_path_uniform: bool = False,
                 init_values: float | None = 1e-5, ffn_layer: str = "mlp", num_register_tokens: int = 0,
                 interpolate_offset: float = 0.1):
        super().__init__()
        if ffn_layer not in FFN_LAYERS:
            raise ValueError(f"ffn_layer must be one of {sorted(FFN_LAYERS)}, got '{ffn_layer}'")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.img_size = to_3tuple(img_size)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = self.num_features = embed_dim
        self.depth = self.n_blocks = depth
        self.num_heads = num_heads
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset = interpolate_offset
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.patch_grid = self.patch_embed.grid_size(self.img_size)
        num_patches = math.prod(self.patch_grid)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

        # Plain Python (not torch.linspace) so models can be built on the meta device.
        rates = [drop_path_rate] * depth if drop_path_uniform else [
            drop_path_rate * i / max(depth - 1, 1) for i in range(depth)
        ]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias,
                  ffn_bias=ffn_bias, drop_path=rates[i], init_values=init_values,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6), ffn_layer=FFN_LAYERS[ffn_layer])
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """Truncated-normal (std 0.02) linears and position embedding; tiny CLS/register init."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory."""
        self.grad_checkpointing = enable

    # ---------------------------------------------------------------- tokens
    def interpolate_pos_encoding(self, grid: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
        """Position embedding for a token grid ``(h, w, d)`` → ``(1, 1 + h*w*d, E)``.

        The stored cube is resampled trilinearly (in float32) when ``grid`` differs from the
        native grid, and returned unchanged when it matches.
        """
        pos = self.pos_embed
        if tuple(grid) == tuple(self.patch_grid):
            return pos.to(dtype)
        return resample_pos_embed(pos, self.patch_grid, grid, self.interpolate_offset).to(dtype)

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Patch-embed, replace masked patches by the mask token, add CLS + position embedding.

        Args:
            x: ``(B, C, H, W, D)``.
            masks: optional bool ``(B, N)`` (or ``(B, h, w, d)``) of patches to mask.

        Returns:
            ``(B, 1 + R + N, E)`` tokens (CLS, R registers, N patches).
        """
        grid = self.patch_embed.grid_size(x.shape[2:])
        x = self.patch_embed(x)
        if masks is not None:
            masks = masks.reshape(x.shape[0], -1)
            if masks.shape[1] != x.shape[1]:
                raise ValueError(f"masks cover {masks.shape[1]} tokens but the input has {x.shape[1]} patches")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.interpolate_pos_encoding(grid, x.dtype)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1).to(x.dtype), x[:, 1:]], dim=1)
        return x

    def _run_block(self, blk: Block, x):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            fn = blk.forward_list if isinstance(x, list) else blk.forward
            return checkpoint(fn, x, use_reentrant=False)
        return blk.forward_list(x) if isinstance(x, list) else blk(x)

    def _output_dict(self, x: torch.Tensor, masks: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1:],
            "x_prenorm": x,
            "masks": masks,
        }

    # --------------------------------------------------------------- forward
    def forward_features(self, x: torch.Tensor | list[torch.Tensor], masks=None):
        """Backbone features.

        Args:
            x: ``(B, C, H, W, D)``, or a list of such tensors (crop groups; see
                :meth:`forward_features_list`).
            masks: optional bool ``(B, N)`` patch mask (or a list matching ``x``).

        Returns:
            dict with ``x_norm_clstoken (B, E)``, ``x_norm_regtokens (B, R, E)``,
            ``x_norm_patchtokens (B, N, E)``, ``x_prenorm (B, 1+R+N, E)``, ``masks``.
        """
        if isinstance(x, list):
            return self.forward_features_list(x, masks if masks is not None else [None] * len(x))
        x_tok = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            x_tok = self._run_block(blk, x_tok)
        return self._output_dict(x_tok, masks)

    def forward_features_list(self, x_list: list[torch.Tensor], masks_list: list[torch.Tensor | None]):
        """Features of several crop groups with different spatial sizes in one pass.

        Token-wise layers run once on all groups' tokens; attention runs once per group.

        Args:
            x_list: tensors ``(B_i, C, H_i, W_i, D_i)``.
            masks_list: per group a bool ``(B_i, N_i)`` mask or None.

        Returns:
            list of the dicts of :meth:`forward_features`, one per group.
        """
        if len(x_list) != len(masks_list):
            raise ValueError(f"{len(x_list)} crop groups but {len(masks_list)} masks entries")
        toks = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)]
        for blk in self.blocks:
            toks = self._run_block(blk, toks)
        return [self._output_dict(t, m) for t, m in zip(toks, masks_list)]

    def forward(self, x, masks=None, is_training: bool = False):
        """``is_training=True`` returns the feature dict; otherwise the normalised CLS token ``(B, E)``."""
        out = self.forward_features(x, masks)
        if is_training:
            return out
        return self.head(out["x_norm_clstoken"])

    # ------------------------------------------------------- intermediates
    def _block_indices(self, n: int | Sequence[int]) -> list[int]:
        if isinstance(n, int):
            if not 1 <= n <= self.depth:
                raise ValueError(f"n must be in [1, {self.depth}] (last n blocks), got {n}")
            return list(range(self.depth - n, self.depth))
        idx = [int(i) for i in n]
        bad = [i for i in idx if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"Block indices {bad} out of range for a depth-{self.depth} model")
        return idx

    def get_intermediate_layers(self, x: torch.Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True):
        """Outputs of selected blocks.

        Args:
            x: ``(B, C, H, W, D)``.
            n: the last ``n`` blocks (int) or a list of block indices (0-based).
            reshape: return patch tokens as ``(B, E, h, w, d)`` instead of ``(B, N, E)``.
            return_class_token: also return the CLS token ``(B, E)`` of each block.
            norm: apply the final LayerNorm to each output.

        Returns:
            tuple of patch-token tensors, or of ``(patch_tokens, cls_token)`` pairs.
        """
        wanted = self._block_indices(n)
        grid = self.patch_embed.grid_size(x.shape[2:])
        tok = self.prepare_tokens_with_masks(x)
        outputs = {}
        for i, blk in enumerate(self.blocks[: max(wanted) + 1]):
            tok = self._run_block(blk, tok)
            if i in wanted:
                outputs[i] = tok
        results = []
        r = self.num_register_tokens
        for i in wanted:
            out = self.norm(outputs[i]) if norm else outputs[i]
            cls, patches = out[:, 0], out[:, r + 1:]
            if reshape:
                patches = patches.reshape(x.shape[0], *grid, -1).permute(0, 4, 1, 2, 3).contiguous()
            results.append((patches, cls) if return_class_token else patches)
        return tuple(results)

    @torch.no_grad()
    def get_last_self_attention(self, x: torch.Tensor, return_full: bool = False) -> torch.Tensor:
        """Attention of the CLS token to the patches in the LAST block, per head.

        Args:
            x: ``(B, C, H, W, D)``.
            return_full: return the whole attention matrix ``(B, heads, T, T)`` (T = 1+R+N).

        Returns:
            ``(B, heads, N)``: the CLS row restricted to patch tokens and renormalised so each
            head's map sums to 1 over patches (how the CLS token distributes its attention
            among patches); reshape to ``(B, heads, h, w, d)`` with the patch grid.
        """
        tok = self.prepare_tokens_with_masks(x)
        for blk in self.blocks[:-1]:
            tok = blk(tok)
        _, attn = self.blocks[-1].forward_with_attention(tok)
        if return_full:
            return attn
        cls_to_patch = attn[:, :, 0, self.num_register_tokens + 1:]
        return cls_to_patch / cls_to_patch.sum(dim=-1, keepdim=True)
