"""3D ViT backbones, their registry, and building one from a description (config, name or ``none``).

Reading and writing checkpoints lives in :mod:`dinov2.checkpoints`; this package never imports it.
"""

from .build import BackboneConfigError, backbone_kwargs_from_config, build_random_backbone, is_random_init
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
    "MODEL_REGISTRY", "BackboneConfigError", "VisionTransformer3D", "backbone_kwargs_from_config",
    "build_model", "build_random_backbone", "is_random_init", "register_model",
    "vit_tiny_3d", "vit_small_3d", "vit_base_3d", "vit_large_3d", "vit_giant2_3d",
]
