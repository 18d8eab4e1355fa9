"""TensorBoard of a segmentation finetuning run (``train.tensorboard``, ``--tensorboard``).

Events go to ``<output_dir>/tensorboard/``; the step is the number of iterations done:

* every ``train.log_period_iterations``: ``train/loss`` (mean since the last log), ``train/lr``,
  ``train/iterations_per_s`` and ``train/samples_per_s`` (training crops per second);
* every validation: ``validation/mean_dice`` (foreground channels), ``validation/dice_<channel>``
  (every channel; spaces in names become ``_``) and the image ``validation/preview``: an axial
  slice of the first validation case, image | reference | prediction
  (:func:`.preview.validation_preview`), from the prediction the validation made anyway.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from dinov2.eval.presets import DatasetPreset
from dinov2.utils.tensorboard import TensorBoard

from .preview import label_names, validation_preview

logger = logging.getLogger(__name__)

SETTING = "train.tensorboard (--tensorboard)"


def open_tensorboard(cfg: DictConfig, out_dir: Path, done: int) -> TensorBoard:
    """The run's writer; a run resumed after ``done`` iterations hides the later events of the killed attempt."""
    return TensorBoard(out_dir, enabled=bool(cfg.train.tensorboard), setting=SETTING, purge_step=done + 1)


def log_training(tb: TensorBoard, done: int, loss: float, lr: float, seconds_per_it: float,
                 crops_per_it: int) -> None:
    """Scalars of a logging period: mean loss, learning rate, iterations and training crops per second."""
    rate = 1.0 / seconds_per_it if seconds_per_it > 0 else math.nan
    tb.scalars({"loss": loss, "lr": lr, "iterations_per_s": rate, "samples_per_s": rate * crops_per_it},
               done, group="train")


def log_validation(tb: TensorBoard, done: int, summary: dict[str, Any]) -> None:
    """``validation/mean_dice`` and ``validation/dice_<channel>`` of :func:`.metrics.summarize`'s ``summary``."""
    tb.scalar("validation/mean_dice", summary["mean_dice"], done)
    for name, value in summary["dice"].items():
        tb.scalar(f"validation/dice_{name.replace(' ', '_')}", value, done)


def label_map(masks: torch.Tensor, multilabel: bool) -> np.ndarray:
    """Channel masks ``(K, X, Y, Z)`` as one integer label map ``(X, Y, Z)``.

    Classes: the channel index of the set mask (0 = background). Regions: region ``k`` is
    value ``k + 1``, later regions painted over earlier ones.
    """
    if not multilabel:
        return masks.argmax(0).numpy().astype(np.int64)
    out = np.zeros(masks.shape[1:], dtype=np.int64)
    for k, mask in enumerate(masks.numpy()):
        out[mask > 0] = k + 1
    return out


def case_preview(item: dict, pred: torch.Tensor, target: torch.Tensor, preset: DatasetPreset):
    """:func:`.preview.validation_preview` of one evaluated case.

    Args:
        item: the preprocessed case (``image`` ``(C, X, Y, Z)``, a MetaTensor with its affine;
            the first channel is shown).
        pred, target: ``(1, K, X, Y, Z)`` predicted and reference channel masks.
        preset: the dataset preset (class or region names for the legend).
    """
    image = item["image"]
    affine = np.asarray(getattr(image, "affine", np.eye(4)), dtype=np.float64)
    names = ({k + 1: n for k, n in enumerate(preset.channel_names)} if preset.multilabel else label_names(preset))
    return validation_preview(np.asarray(image[0], dtype=np.float32), label_map(target[0].cpu(), preset.multilabel),
                              label_map(pred[0].cpu(), preset.multilabel), affine, names)


class PreviewCatcher:
    """``evaluate``'s per-case hook that keeps the preview of case 0 when TensorBoard is active."""

    def __init__(self, tb: TensorBoard, preset: DatasetPreset) -> None:
        self.tb, self.preset, self.image = tb, preset, None

    def __call__(self, index: int, item: dict, pred: torch.Tensor, target: torch.Tensor) -> None:
        if index != 0 or not self.tb.active:
            return
        try:
            self.image = case_preview(item, pred, target, self.preset)
        except Exception as exc:  # noqa: BLE001 - a picture must never stop a finetuning run
            logger.warning("No TensorBoard preview of validation case %s (%s: %s); training continues.",
                           item.get("name", 0), type(exc).__name__, exc)
