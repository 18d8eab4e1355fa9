"""Pretraining: the DINO + iBOT + KoLeo meta-architecture, its training loop, metrics and collapse watch.

The data stream it trains on lives in :mod:`dinov2.data.loader`, its optimiser schedules in
:mod:`dinov2.optim` and its checkpoints in :mod:`dinov2.checkpoints`.

Entry point: ``python -m dinov2.train.train3d`` (not imported here, so that ``-m`` runs it
without a double import).
"""

from dinov2.train.metrics import MetricsLogger, effective_rank, mean_row_entropy, prototype_usage_entropy
from dinov2.train.ssl_meta_arch import SSLMetaArch, SSLNetwork, backbone_from_config

__all__ = [
    "MetricsLogger",
    "SSLMetaArch",
    "SSLNetwork",
    "backbone_from_config",
    "effective_rank",
    "mean_row_entropy",
    "prototype_usage_entropy",
]
