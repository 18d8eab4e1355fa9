"""Segmentation heads on 3D ViT features: UNETR, ViT-Adapter-UNETR and a linear probe."""

from .linear import LinearHead
from .ms_deform_attn3d import MSDeformAttn3D
from .taps import evenly_spaced_taps, last_taps
from .unetr import UNETRHead
from .vit_adapter import ViTAdapterUNETRHead

__all__ = ["LinearHead", "MSDeformAttn3D", "UNETRHead", "ViTAdapterUNETRHead", "evenly_spaced_taps", "last_taps"]
