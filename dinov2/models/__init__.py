"""3D ViT backbones, their registry and checkpoint loading."""

from .registry import (
    MODEL_REGISTRY,
    build_model,
    register_model,
    vit_base_3d,
    vit_giant2_3d,
    vit_large_3d,
    vit_small_3d,
    vit_tiny_3d,
)
from .vision_transformer import VisionTransformer3D

__all__ = [
    "MODEL_REGISTRY", "VisionTransformer3D", "build_model", "register_model",
    "vit_tiny_3d", "vit_small_3d", "vit_base_3d", "vit_large_3d", "vit_giant2_3d",
]
