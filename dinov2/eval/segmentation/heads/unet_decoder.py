"""U-Net decoder in the nnU-Net style: transposed-convolution upsampling, skip concatenation, and
two conv–InstanceNorm–LeakyReLU stages per level; optional deep supervision."""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.blocks import UnetOutBlock
from torch import nn

from .blocks import conv_norm_act


def conv_stages(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two conv(3×3×3)–InstanceNorm–LeakyReLU stages: ``(B, Cin, *S)`` → ``(B, Cout, *S)``."""
    return nn.Sequential(conv_norm_act(in_channels, out_channels), conv_norm_act(out_channels, out_channels))


class UNetDecoder(nn.Module):
    """Decode skips at strides ``1, 2, 4, ..`` (finest first) into logits.

    The coarsest skip goes through two stages; every finer level upsamples the coarser result
    by a 2×2×2 transposed convolution, concatenates its skip and applies two stages.

    Args:
        widths: channels of each level, full resolution first (``len >= 2``).
        out_channels: classes / label channels.
        deep_supervision: in training mode also return logits of the coarser levels (all but the
            coarsest).

    Example:
        >>> dec = UNetDecoder([4, 8, 16], out_channels=3)
        >>> skips = [torch.randn(1, w, 16 // 2 ** l, 16 // 2 ** l, 16 // 2 ** l) for l, w in enumerate([4, 8, 16])]
        >>> dec(skips).shape
        torch.Size([1, 3, 16, 16, 16])
    """

    def __init__(self, widths: Sequence[int], out_channels: int, deep_supervision: bool = False):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths) < 1 or out_channels < 1:
            raise ValueError(f"UNetDecoder needs >= 2 positive widths and out_channels >= 1, "
                             f"got {widths}, {out_channels}")
        self.deep_supervision = deep_supervision
        finer = list(reversed(range(len(widths) - 1)))  # decoding order: coarse to fine
        self.bottom = conv_stages(widths[-1], widths[-1])
        self.ups = nn.ModuleList([nn.ConvTranspose3d(widths[lv + 1], widths[lv], 2, stride=2) for lv in finer])
        self.stages = nn.ModuleList([conv_stages(2 * widths[lv], widths[lv]) for lv in finer])
        supervised = len(widths) - 1 if deep_supervision else 1
        self.outs = nn.ModuleList([UnetOutBlock(3, widths[lv], out_channels) for lv in range(supervised)])

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Decode.

        Args:
            skips: ``len(widths)`` maps ``(B, widths[l], *S / 2**l)``, full resolution first.

        Returns:
            logits ``(B, K, *S)``; with deep supervision in training mode a list of logits
            ``(B, K, *S / 2**l)`` for ``l = 0 .. len(widths) - 2`` (decreasing resolution).
        """
        x = self.bottom(skips[-1])
        decoded = {}
        for level, up, stage in zip(reversed(range(len(skips) - 1)), self.ups, self.stages):
            x = stage(torch.cat([up(x), skips[level]], dim=1))
            decoded[level] = x
        if self.deep_supervision and self.training:
            return [out(decoded[level]) for level, out in enumerate(self.outs)]
        return self.outs[0](x)
