"""Multi-head self-attention through PyTorch SDPA, optional xformers on CUDA, explicit for maps.

The fast path is ``torch.nn.functional.scaled_dot_product_attention``, which runs on CPU and
picks flash / memory-efficient kernels on CUDA by itself. xformers is used only when it is
installed, the input is on CUDA and ``DINOV2_XFORMERS`` is not ``0``; it is never required.
The explicit path (softmax of ``q kᵀ``) exists only to return attention weights for
visualisation.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

_UNPROBED = object()
_xformers = _UNPROBED


def xformers_ops():
    """``xformers.ops`` when installed, enabled and CUDA is present; else None.

    Probed on the first attention over a CUDA tensor, not at import: importing the model code
    neither initialises CUDA nor imports xformers. :func:`reset_xformers_probe` probes again.
    """
    global _xformers
    if _xformers is _UNPROBED:
        _xformers = _probe_xformers()
    return _xformers


def reset_xformers_probe() -> None:
    """Forget the probe of :func:`xformers_ops` (after changing ``DINOV2_XFORMERS``)."""
    global _xformers
    _xformers = _UNPROBED


def _probe_xformers():
    if os.environ.get("DINOV2_XFORMERS", "1") == "0" or not torch.cuda.is_available():
        return None
    try:
        import xformers.ops as xops  # noqa: PLC0415 - optional dependency
    except ImportError:
        return None
    return xops


class Attention(nn.Module):
    """Multi-head self-attention with a packed ``qkv`` projection.

    The ``qkv`` output is laid out as ``(3, heads, head_dim)`` along its last axis, the layout
    of the published 3DINO-ViT / DINOv2 checkpoints.

    Args:
        dim: token width.
        num_heads: attention heads; must divide ``dim``.
        qkv_bias, proj_bias: biases of the projections.
        attn_drop, proj_drop: dropout rates.

    Shapes: ``(B, N, dim)`` → ``(B, N, dim)``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, N, 3*dim)`` → q, k, v each ``(B, heads, N, head_dim)``."""
        B, N, _ = qkv.shape
        qkv = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Attention on packed ``qkv`` ``(B, N, 3*dim)`` → merged heads ``(B, N, dim)`` (before proj)."""
        B, N, _ = qkv.shape
        drop = self.attn_drop if self.training else 0.0
        xops = xformers_ops() if qkv.is_cuda else None
        if xops is not None:
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).unbind(2)
            out = xops.memory_efficient_attention(q, k, v, p=drop)
            return out.reshape(B, N, -1)
        q, k, v = self.split_qkv(qkv)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        return out.transpose(1, 2).reshape(B, N, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(self.attend(self.qkv(x))))

    def forward_with_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Explicit softmax attention. Returns output ``(B, N, dim)`` and weights ``(B, heads, N, N)``."""
        B, N, C = x.shape
        q, k, v = self.split_qkv(self.qkv(x))
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out)), attn
