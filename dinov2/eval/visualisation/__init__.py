"""Unsupervised views of a frozen backbone: token maps, PCA, CLS attention, PNG montages.

Entry point: ``python -m dinov2.eval.visualisation`` (the run itself is :mod:`.run`, not imported
here, so ``-m`` runs it without a double import).
"""

from .attention import display_scale, last_block_attention
from .inputs import VisVolume, load_vis_volume, to_tensor
from .montage import attention_montage, heat_colors, montage, pca_montage
from .pca import PCAFit, fit_pca, scale_scores
from .tokens import INPUT_TYPES, TokenGeometry, TokenMaps, compute_token_maps, to_voxels, token_fraction

__all__ = [
    "display_scale", "last_block_attention", "VisVolume", "load_vis_volume", "to_tensor", "attention_montage",
    "heat_colors", "montage", "pca_montage", "PCAFit", "fit_pca", "scale_scores", "INPUT_TYPES", "TokenGeometry",
    "TokenMaps", "compute_token_maps", "to_voxels", "token_fraction",
]
