"""Per-case, per-class Dice and HD95 through MONAI, and their NaN-safe summaries.

Conventions (stated once, used everywhere):

* A class absent from a case's ground truth has Dice NaN and HD95 NaN for that case; it is left
  out of every mean (``nanmean``), so cases without a small organ do not count as perfect or as
  failures.
* A class present in the ground truth but not predicted at all has Dice 0 and HD95 equal to the
  volume's diagonal in mm (the largest distance possible in that image), so a miss is penalised
  instead of silently dropped.
* HD95 is in millimetres, from the voxel spacing of the evaluated volume.
* Summaries give each class's mean over cases, the mean over foreground classes (background
  excluded; the headline number), and the mean over all channels including background, for
  comparison with references that report it. Multi-label tasks have no background channel.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot


def discretize(probs: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Binary masks from predicted probabilities.

    Args:
        probs: ``(B, K, H, W, D)`` softmax (multi-class) or sigmoid (multi-label) probabilities.
        multilabel: threshold each channel at 0.5 instead of taking the argmax over channels.

    Returns:
        ``(B, K, H, W, D)`` float masks of 0/1.
    """
    if multilabel:
        return (probs > 0.5).float()
    return one_hot(probs.argmax(1, keepdim=True), num_classes=probs.shape[1], dim=1)


def label_to_masks(label: torch.Tensor, num_channels: int, multilabel: bool) -> torch.Tensor:
    """Ground truth as binary masks: a class map ``(B, 1, ...)`` is one-hot encoded; region channels pass."""
    if multilabel:
        if label.shape[1] != num_channels:
            raise ValueError(f"Expected {num_channels} region channels in the label, got {label.shape[1]}")
        return (label > 0.5).float()
    return one_hot(label.long(), num_classes=num_channels, dim=1)


def case_metrics(pred: torch.Tensor, target: torch.Tensor, spacing: Sequence[float],
                 hd_percentile: float = 95.0) -> dict[str, np.ndarray]:
    """Dice and HD of one case, per channel.

    Args:
        pred: ``(1, K, H, W, D)`` binary masks.
        target: ``(1, K, H, W, D)`` binary masks.
        spacing: voxel size in mm along (H, W, D).
        hd_percentile: percentile of the surface distances (95 → HD95).

    Returns:
        ``{"dice": (K,), "hd95": (K,)}`` float arrays (NaN where the class is absent from ``target``).
    """
    if pred.shape != target.shape or pred.shape[0] != 1:
        raise ValueError(f"pred and target must both be (1, K, H, W, D), got {tuple(pred.shape)} and {tuple(target.shape)}")
    pred, target = pred.float().cpu(), target.float().cpu()
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=True)(pred, target)[0].numpy()
    with warnings.catch_warnings():  # MONAI warns for every empty mask; the NaN policy is handled below
        warnings.simplefilter("ignore")
        hd = HausdorffDistanceMetric(include_background=True, percentile=hd_percentile, reduction="none")(
            pred, target, spacing=[float(s) for s in spacing])[0].numpy()
    present = target.flatten(2).sum(-1)[0].numpy() > 0
    predicted = pred.flatten(2).sum(-1)[0].numpy() > 0
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape[2:], spacing)))
    dice = np.where(present, dice, np.nan)
    hd = np.where(present & ~predicted, diagonal, np.where(present, hd, np.nan))
    return {"dice": dice.astype(np.float64), "hd95": hd.astype(np.float64)}


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def summarize(cases: Sequence[dict[str, Any]], channel_names: Sequence[str], foreground: Sequence[int]) -> dict[str, Any]:
    """Class means over cases and the foreground / with-background averages.

    Args:
        cases: dicts with ``"dice"`` and optionally ``"hd95"`` arrays ``(K,)`` (from :func:`case_metrics`).
        channel_names: name of each channel.
        foreground: indices of foreground channels.

    Returns:
        ``{"dice": {name: mean}, "hd95": {name: mean}, "mean_dice": ..., "mean_hd95": ...,
        "mean_dice_with_background": ..., "mean_hd95_with_background": ...}`` (NaN when nothing
        could be measured).
    """
    out: dict[str, Any] = {}
    for metric in [m for m in ("dice", "hd95") if cases and all(m in c for c in cases)]:
        per_class = [_nanmean([c[metric][k] for c in cases]) for k in range(len(channel_names))]
        out[metric] = dict(zip(channel_names, per_class))
        out[f"mean_{metric}"] = _nanmean([per_class[k] for k in foreground])
        out[f"mean_{metric}_with_background"] = _nanmean(per_class)
    return out
