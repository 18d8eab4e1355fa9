"""Classification metrics of a linear probe: accuracy, balanced accuracy, macro AUROC, confusion."""

from __future__ import annotations

import math
import warnings

import torch
from monai.metrics import compute_roc_auc


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts of (true class, predicted class) pairs.

    Args:
        predictions: ``(N,)`` predicted class indices.
        labels: ``(N,)`` true class indices in ``[0, num_classes)``.
        num_classes: number of classes ``C``.

    Returns:
        int64 ``(C, C)``: row = true class, column = predicted class.
    """
    if predictions.shape != labels.shape or predictions.ndim != 1:
        raise ValueError(f"predictions and labels must both be (N,), got {tuple(predictions.shape)} and "
                         f"{tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}")
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def macro_auroc(probabilities: torch.Tensor, labels: torch.Tensor) -> tuple[float, list[float | None]]:
    """One-vs-rest ROC AUC per class and their unweighted mean.

    A class absent from ``labels`` (or the only class present) has no AUROC: it is reported as
    ``None`` and left out of the mean, so the mean is over the classes where it is defined.

    Args:
        probabilities: ``(N, C)`` class scores (e.g. softmax).
        labels: ``(N,)`` true class indices.

    Returns:
        ``(macro mean or nan if no class qualifies, per-class list)``.
    """
    num_classes = probabilities.shape[1]
    counts = torch.bincount(labels.long(), minlength=num_classes)
    defined = [(0 < int(c) < labels.numel()) for c in counts]
    per_class: list[float | None] = [None] * num_classes
    if any(defined):
        onehot = torch.nn.functional.one_hot(labels.long(), num_classes).float()
        with warnings.catch_warnings():  # MONAI warns about the classes we already leave out
            warnings.simplefilter("ignore")
            scores = compute_roc_auc(probabilities.float(), onehot, average="none")
        for c in range(num_classes):
            if defined[c]:
                per_class[c] = float(scores[c])
    valid = [v for v in per_class if v is not None]
    return (sum(valid) / len(valid) if valid else math.nan), per_class


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str] | None = None) -> dict:
    """All metrics of one classifier on one split.

    Args:
        logits: ``(N, C)`` classifier outputs.
        labels: ``(N,)`` true class indices.
        class_names: optional ``C`` names, stored with the results.

    Returns:
        dict with ``n``, ``accuracy``, ``balanced_accuracy`` (mean recall over the classes that
        occur in ``labels``), ``auroc_macro``, ``auroc_per_class``, ``recall_per_class``
        (``None`` for absent classes), ``confusion_matrix`` (rows true, columns predicted, as
        lists) and ``class_names``.
    """
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits must be (N, C) matching labels (N,), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    num_classes = logits.shape[1]
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    predictions = logits.argmax(dim=1)
    matrix = confusion_matrix(predictions, labels, num_classes)
    support = matrix.sum(dim=1)
    recall = [float(matrix[c, c] / support[c]) if support[c] else None for c in range(num_classes)]
    present = [r for r in recall if r is not None]
    auroc, auroc_per_class = macro_auroc(torch.softmax(logits.float(), dim=1), labels)
    n = int(labels.numel())
    return {
        "n": n,
        "accuracy": float(matrix.diagonal().sum()) / n if n else math.nan,
        "balanced_accuracy": sum(present) / len(present) if present else math.nan,
        "auroc_macro": auroc,
        "auroc_per_class": auroc_per_class,
        "recall_per_class": recall,
        "confusion_matrix": matrix.tolist(),
        "class_names": list(class_names) if class_names is not None else [str(c) for c in range(num_classes)],
    }
