"""Small building blocks shared by the dense heads (DinoUNet, DPT, UNetFusion)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

LEAKY_RELU = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})
INSTANCE_NORM = ("instance", {"affine": True})  # nnU-Net: affine InstanceNorm


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resample ``(B, C, *S)`` to ``(B, C, *size)``: trilinear when enlarging, box average when shrinking.

    Averaging (``area``) rather than trilinear sampling when shrinking, so every source voxel
    contributes (trilinear would skip voxels and alias).
    """
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    if all(t <= s for t, s in zip(size, x.shape[2:])):
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


def norm_groups(channels: int) -> int:
    """Up to 8 groups of at least 2 channels (when ``channels >= 2``): every group then normalises
    at least 2 values, even on a 1-voxel map in training."""
    groups = math.gcd(channels, 8)
    return groups // 2 if groups == channels > 1 else groups  # 2, 4, 8 channels: halve the groups


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm of :func:`norm_groups`; unlike InstanceNorm it works for batch 1 and 1-voxel maps
    (the coarsest level of a small crop)."""
    return nn.GroupNorm(norm_groups(channels), channels)


def group_norm_spec(channels: int) -> tuple[str, dict]:
    """MONAI norm spec of :func:`group_norm`."""
    return ("group", {"num_groups": norm_groups(channels)})



def conv_norm_act(in_channels: int, out_channels: int, norm: tuple[str, dict] | str = INSTANCE_NORM,
                  kernel_size: int = 3) -> Convolution:
    """3D convolution → norm → LeakyReLU(0.01) (the nnU-Net stage), shape-preserving:
    ``(B, Cin, *S) → (B, Cout, *S)``."""
    return Convolution(3, in_channels, out_channels, kernel_size=kernel_size, norm=norm, act=LEAKY_RELU, bias=False)


def check_sides(image: torch.Tensor, multiple: int, head: str) -> None:
    """Raise a ``ValueError`` naming the fix when a spatial side of ``(B, C, *S)`` is not a multiple of ``multiple``."""
    if any(s % multiple for s in image.shape[2:]):
        raise ValueError(f"{head} needs every spatial side to be a multiple of {multiple}, got "
                         f"{tuple(image.shape[2:])}; change dataset.image_size (--image-size)")


def power_of_two_log(value: int, what: str) -> int:
    """``log2(value)`` for a power of two >= 1, else a ``ValueError`` naming ``what``."""
    log = int(round(math.log2(value))) if value > 0 else -1
    if log < 0 or 2 ** log != value:
        raise ValueError(f"{what} must be a power of two, got {value}")
    return log


class _CpuBf16SafeConv3d(nn.Conv3d):
    """``nn.Conv3d`` that convolves in fp32 a map 2 voxels high under CPU autocast
    (see :func:`guard_cpu_bf16_convs`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Cin, *S)`` → ``(B, Cout, *S')``, in fp32 for the maps the CPU bf16 kernel gets wrong."""
        # Cheap checks first: outside CPU autocast (GPU, fp32, ONNX export) the shape is never read.
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and x.shape[2] == 2:
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def guard_cpu_bf16_convs(module: nn.Module) -> nn.Module:
    """Work around a wrong weight gradient of bf16 3D convolutions on the CPU; returns ``module``.

    With PyTorch 2.13 (CPU build, oneDNN), a stride-1 3×3×3 ``Conv3d`` under bf16 autocast gets a
    weight gradient that is ~100 % wrong (up to 1e33, or inf) whenever the input's first spatial
    side is exactly 2: the coarse levels of small windows (DPT's 1/32 at 64³, UNetFusion's 1/16 at
    32³ with patch 16, a DinoUNet decoder bottom at 16³). Every stride-1 ``Conv3d`` with a kernel
    larger than 1 in ``module`` becomes a subclass (same parameters and state-dict names) that
    convolves such maps in fp32, which costs nothing at that size.
    ``tests/eval/test_heads_dense.py::test_cpu_bf16_conv_guard`` checks the guarded gradient.
    """
    for m in module.modules():
        if type(m) is nn.Conv3d and max(m.kernel_size) > 1 and m.stride == (1, 1, 1):
            m.__class__ = _CpuBf16SafeConv3d
    return module
