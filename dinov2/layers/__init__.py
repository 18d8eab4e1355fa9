"""Small building blocks of the 3D ViT (torch only; nothing here knows about training)."""

from .attention import Attention
from .block import Block
from .dino_head import DINOHead, WeightNormLinear
from .drop_path import DropPath
from .layer_scale import LayerScale
from .mlp import Mlp, SwiGLUFFN
from .patch_embed import PatchEmbed3D

__all__ = ["Attention", "Block", "DINOHead", "WeightNormLinear", "DropPath", "LayerScale", "Mlp", "SwiGLUFFN", "PatchEmbed3D"]
