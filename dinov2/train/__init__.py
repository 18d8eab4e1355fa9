"""Pretraining: the DINO + iBOT + KoLeo meta-architecture, its data stream, checkpoints and metrics.

Entry point: ``python -m dinov2.train.train3d`` (not imported here, so that ``-m`` runs it
without a double import).
"""

from dinov2.train.checkpointer import TrainingCheckpointer
from dinov2.train.metrics import MetricsLogger, effective_rank, mean_row_entropy, prototype_usage_entropy
from dinov2.train.ssl_meta_arch import SSLMetaArch, SSLNetwork, backbone_from_config

__all__ = [
    "MetricsLogger",
    "SSLMetaArch",
    "SSLNetwork",
    "TrainingCheckpointer",
    "backbone_from_config",
    "effective_rank",
    "mean_row_entropy",
    "prototype_usage_entropy",
]
