"""Named model factories (``vit_small_3d`` … ``vit_giant2_3d``) and a registry to build by name."""

from __future__ import annotations

from typing import Callable

from .vision_transformer import VisionTransformer3D

MODEL_REGISTRY: dict[str, Callable[..., VisionTransformer3D]] = {}


def register_model(fn: Callable[..., VisionTransformer3D]) -> Callable[..., VisionTransformer3D]:
    """Decorator: make a factory buildable by its function name."""
    MODEL_REGISTRY[fn.__name__] = fn
    return fn


def build_model(arch: str, **kwargs) -> VisionTransformer3D:
    """Build a registered backbone by name; ``kwargs`` override the factory's defaults."""
    if arch not in MODEL_REGISTRY:
        raise ValueError(f"Unknown architecture '{arch}'. Available: {', '.join(sorted(MODEL_REGISTRY))}")
    return MODEL_REGISTRY[arch](**kwargs)


def _vit(defaults: dict, kwargs: dict) -> VisionTransformer3D:
    return VisionTransformer3D(**{**defaults, **kwargs})


@register_model
def vit_tiny_3d(**kwargs) -> VisionTransformer3D:
    """A very small ViT (64 dim, 4 blocks, 4 heads) for tests and CPU demos."""
    return _vit(dict(embed_dim=64, depth=4, num_heads=4, mlp_ratio=4), kwargs)


@register_model
def vit_small_3d(**kwargs) -> VisionTransformer3D:
    """ViT-S: 384 dim, 12 blocks, 6 heads."""
    return _vit(dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4), kwargs)


@register_model
def vit_base_3d(**kwargs) -> VisionTransformer3D:
    """ViT-B: 768 dim, 12 blocks, 12 heads."""
    return _vit(dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4), kwargs)


@register_model
def vit_large_3d(**kwargs) -> VisionTransformer3D:
    """ViT-L: 1024 dim, 24 blocks, 16 heads (the published 3DINO-ViT)."""
    return _vit(dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4), kwargs)


@register_model
def vit_giant2_3d(**kwargs) -> VisionTransformer3D:
    """ViT-g/2: 1536 dim, 40 blocks, 24 heads, SwiGLU feed-forward."""
    return _vit(dict(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=4, ffn_layer="swiglu"), kwargs)
