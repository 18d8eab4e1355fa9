"""DINO / iBOT projection head: MLP -> L2 normalise -> weight-normalised prototype layer.

Parameter names match the published 3DINO-ViT teacher checkpoint (``dino_head.*`` and
``ibot_head.*``): ``mlp.0``, ``mlp.2``, ``mlp.4`` for the three linears (GELUs sit at the odd
indices) and ``last_layer.weight_g`` (K, 1) / ``last_layer.weight_v`` (K, bottleneck). The
prototype layer is a small explicit module instead of ``torch.nn.utils.weight_norm``, which is
deprecated and whose replacement (parametrizations) stores different key names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _l2_eps(dtype: torch.dtype) -> float:
    """Normalisation eps that is representable in ``dtype``.

    1e-12 underflows to 0 in float16 (smallest subnormal ~6e-8), which turns an all-zero
    bottleneck vector into 0/0 = NaN; bfloat16 and float32 share float32's exponent range.
    """
    return 1e-6 if dtype == torch.float16 else 1e-12


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight ``g * v / ||v||`` (norm over each output row).

    Args:
        in_features: input width (the bottleneck dimension).
        out_features: output width (the number of prototypes K).
        train_norm: if False (DINO's ``norm_last_layer=True``) ``weight_g`` stays at 1 and is not
            trained, so every prototype is a unit vector and logits are cosine similarities.
    """

    def __init__(self, in_features: int, out_features: int, train_norm: bool = False) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"WeightNormLinear: in_features={in_features} and out_features={out_features} must be >= 1 "
                "(dinov2/layers/dino_head.py)."
            )
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=train_norm)
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    @property
    def weight(self) -> Tensor:
        """(out_features, in_features) effective weight; rows have norm ``|g|``."""
        v_norm = torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True)
        return self.weight_g * (self.weight_v / v_norm.clamp_min(torch.finfo(v_norm.dtype).tiny))

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_features) -> (..., out_features)."""
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"train_norm={self.weight_g.requires_grad}"
        )


def _build_mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int, use_bn: bool) -> nn.Sequential:
    if nlayers == 1:
        return nn.Sequential(nn.Linear(in_dim, bottleneck_dim))
    modules: list[nn.Module] = []
    widths = [in_dim] + [hidden_dim] * (nlayers - 1)
    for width_in, width_out in zip(widths[:-1], widths[1:]):
        modules.append(nn.Linear(width_in, width_out))
        if use_bn:
            modules.append(nn.BatchNorm1d(width_out))
        modules.append(nn.GELU())
    modules.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*modules)


class DINOHead(nn.Module):
    """Projection head shared in form by the DINO (CLS) and iBOT (patch) objectives.

    Args:
        in_dim: backbone embedding width.
        out_dim: number of prototypes K (65536 in the published model).
        hidden_dim: MLP hidden width.
        bottleneck_dim: width of the normalised embedding fed to the prototypes.
        nlayers: number of linear layers in the MLP (>= 1).
        use_bn: BatchNorm1d after each hidden linear (shifts the ``mlp.<i>`` indices; the
            published checkpoint has none).
        norm_last_layer: keep the prototype norms fixed at 1 (``weight_g`` frozen).

    Example:
        >>> head = DINOHead(in_dim=32, out_dim=64, hidden_dim=48, bottleneck_dim=16)
        >>> head(torch.randn(5, 32)).shape
        torch.Size([5, 64])
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_dim", in_dim),
            ("out_dim", out_dim),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
            ("nlayers", nlayers),
        ):
            if value < 1:
                raise ValueError(
                    f"DINOHead: {name} must be >= 1, got {value} (dinov2/layers/dino_head.py); "
                    "check the dino.head_* / ibot.head_* config keys."
                )
        self.mlp = _build_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, use_bn)
        self.mlp.apply(self._init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, train_norm=not norm_last_layer)

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Prototype logits.

        Args:
            x: (..., in_dim) CLS or patch tokens (e.g. (B, D) or (M, D)).

        Returns:
            (..., out_dim) logits; with ``norm_last_layer`` these are cosine similarities in
            [-1, 1] between the normalised bottleneck embedding and each prototype.
        """
        x = self.mlp(x)
        x = F.normalize(x, p=2, dim=-1, eps=_l2_eps(x.dtype))
        return self.last_layer(x)
