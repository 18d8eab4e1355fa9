"""The one TensorBoard writer of every training entry point (an optional extra).

Pretraining, segmentation finetuning and the linear probe write their event files to
``<output-dir>/tensorboard/`` through :class:`TensorBoard` when asked to (``--tensorboard``, or
the entry point's config key). The ``tensorboard`` package is an optional extra
(:data:`INSTALL_HINT`): when it is missing, the run says so in ONE warning and continues
without events; every call is then a no-op. Asked for nothing, nothing is imported.

Tags are ``group/name`` (``loss/total_loss``, ``validation/mean_dice``), so TensorBoard shows
one section per group. ``python -m tensorboard.main --logdir <output-dir>`` shows a run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
INSTALL_HINT = "pip install 'dinov2-3d[tensorboard]'"


def _summary_writer_class() -> type | None:
    """``torch.utils.tensorboard.SummaryWriter``, or None when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - an optional extra, imported on demand
    except ImportError:
        return None
    return SummaryWriter


def _as_number(value: Any) -> float | None:
    """A Python or 0-d tensor / array number as float; None for anything else (texts, lists, bools)."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _as_hwc_uint8(image: Any) -> np.ndarray:
    """A Pillow image or an array ``(H, W)`` / ``(H, W, 3)`` as ``uint8`` ``(H, W, 3)``."""
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"An image must be (H, W) or (H, W, 3), got {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
    return array


class TensorBoard:
    """Event files of one run in ``<output_dir>/tensorboard``; a no-op when off or not installed.

    Args:
        output_dir: the run's folder.
        enabled: write events (False on ranks other than 0, or when the run did not ask).
        setting: how the user asked (named by the warning), e.g. ``train.tensorboard``.
        purge_step: a resumed run's first step: events of an earlier attempt at or after it
            are hidden, so a step never shows twice.

    Example:
        >>> with TensorBoard("runs/seg", enabled=True) as tb:  # doctest: +SKIP
        ...     tb.scalars({"loss": 0.7, "lr": 1e-4}, step=20, group="train")
    """

    def __init__(self, output_dir: str | os.PathLike, enabled: bool = True, setting: str = "--tensorboard",
                 purge_step: int | None = None) -> None:
        self.log_dir = Path(output_dir) / TENSORBOARD_DIR
        self._writer = None
        if not enabled:
            return
        writer_class = _summary_writer_class()
        if writer_class is None:
            logger.warning("%s asks for TensorBoard events but the tensorboard package is not installed: this "
                           "run writes none (everything else as usual). Install it with %s.", setting, INSTALL_HINT)
            return
        self._writer = writer_class(log_dir=str(self.log_dir), purge_step=purge_step)

    @property
    def active(self) -> bool:
        """True when events are written (asked for, installed and not closed)."""
        return self._writer is not None

    def scalar(self, tag: str, value: Any, step: int) -> None:
        """One scalar; values that are not numbers (texts, lists) are skipped, NaN is written as NaN.

        Args:
            tag: ``group/name``.
            value: a Python number or a 0-d tensor / array.
            step: the x-axis value (an iteration).
        """
        number = _as_number(value)
        if self._writer is not None and number is not None:
            self._writer.add_scalar(tag, number, int(step))

    def scalars(self, values: Mapping[str, Any], step: int, group: str | None = None) -> None:
        """Every number of ``values`` as its own scalar, tagged ``group/key`` (``key`` without a group)."""
        for key, value in values.items():
            self.scalar(f"{group}/{key}" if group else key, value, step)

    def image(self, tag: str, image: Any, step: int) -> None:
        """One RGB image.

        Args:
            tag: ``group/name``.
            image: a Pillow image, or an array ``(H, W)`` / ``(H, W, 3)``: ``uint8``, or floats in ``[0, 1]``.
            step: the x-axis value.
        """
        if self._writer is not None:
            self._writer.add_image(tag, _as_hwc_uint8(image), int(step), dataformats="HWC")

    def flush(self) -> None:
        """Write pending events to disk (TensorBoard shows them at its next reload)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file; later calls are no-ops."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "TensorBoard":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

