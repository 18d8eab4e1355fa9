"""Pretraining losses and teacher targets: DINO (CLS), iBOT (masked patches), KoLeo, centering."""

from dinov2.loss.centering import (
    CENTERING_KINDS,
    EMACentering,
    SinkhornKnopp,
    build_centering,
    sinkhorn_knopp,
)
from dinov2.loss.dino_clstoken_loss import DINOLoss, dino_pairs
from dinov2.loss.ibot_patch_loss import iBOTPatchLoss, masked_token_weights
from dinov2.loss.koleo_loss import KoLeoLoss, koleo_per_crop

__all__ = [
    "CENTERING_KINDS",
    "DINOLoss",
    "EMACentering",
    "KoLeoLoss",
    "SinkhornKnopp",
    "build_centering",
    "dino_pairs",
    "iBOTPatchLoss",
    "koleo_per_crop",
    "masked_token_weights",
    "sinkhorn_knopp",
]
