"""Linear probing of frozen backbones: feature extraction and cache, the classifier grid, metrics.

Entry point: ``python -m dinov2.eval.linear`` (the run itself is :mod:`.run`, not imported here,
so ``-m`` runs it without a double import).
"""

from .classifiers import POOLINGS, LinearProbe, ProbeGrid, ProbeSetup, setup_grid, train_probe_grid
from .features import ClassificationVolumes, FeatureSet, extract_features, load_or_extract_features
from .metrics import classification_metrics, confusion_matrix, macro_auroc

__all__ = [
    "POOLINGS", "LinearProbe", "ProbeGrid", "ProbeSetup", "setup_grid", "train_probe_grid",
    "ClassificationVolumes", "FeatureSet", "extract_features", "load_or_extract_features",
    "classification_metrics", "confusion_matrix", "macro_auroc",
]
