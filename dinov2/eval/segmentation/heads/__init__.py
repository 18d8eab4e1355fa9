"""Segmentation heads on 3D ViT features: UNETR, ViT-Adapter-UNETR, Dino U-Net, DPT, UNetFusion and a linear probe."""

from .dino_unet import DinoUNetHead
from .dpt import DPTHead
from .linear import LinearHead
from .ms_deform_attn3d import MSDeformAttn3D
from .taps import evenly_spaced_taps, last_taps
from .unet_fusion import UNetFusionHead
from .unetr import UNETRHead
from .vit_adapter import ViTAdapterUNETRHead

__all__ = ["DPTHead", "DinoUNetHead", "LinearHead", "MSDeformAttn3D", "UNETRHead", "UNetFusionHead",
           "ViTAdapterUNETRHead", "evenly_spaced_taps", "last_taps"]
