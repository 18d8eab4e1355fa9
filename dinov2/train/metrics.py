"""What a pretraining run reports: JSON-lines metrics, a progress bar with ETA, collapse monitors,
optionally TensorBoard scalars (``train.tensorboard``: every number of a line, :func:`tensorboard_tag`).

``<output>/training_metrics.json`` holds one JSON object per logging step (every loss term,
schedule values, throughput, data-wait time, collapse monitors), so a run can be plotted with
``pandas.read_json(path, lines=True)``. Only rank 0 writes. When a run resumes from a
checkpoint, lines of iterations at or after the resume point (written by the killed run and
about to be recomputed) are dropped first, so the file never holds an iteration twice.

Collapse monitors (DINO's two failure modes):

* ``teacher_entropy``: mean entropy of the teacher's per-sample softmax. Near ``log K`` means
  every sample gets a flat distribution (uniform collapse).
* ``teacher_prototype_entropy``: entropy of the batch-mean teacher distribution. Near 0 means one
  prototype takes every sample (dominant-dimension collapse).
* ``teacher_cls_effective_rank``: ``exp`` of the entropy of the normalised singular values of
  the teacher's CLS embeddings (RankMe); near 1 means all samples map to one direction.

:mod:`dinov2.train.collapse` turns these into warnings. :func:`progress_line` is the one line
per logging period that ``train3d`` writes to ``log.txt``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor
from tqdm import tqdm

from dinov2.utils.io import atomic_write_text
from dinov2.utils.tensorboard import TensorBoard

logger = logging.getLogger(__name__)

METRICS_FILE = "training_metrics.json"


def mean_row_entropy(probs: Tensor) -> Tensor:
    """Mean over rows of the Shannon entropy (nats) of each row.

    Args:
        probs: ``(R, K)`` rows of probabilities (each sums to 1).

    Returns:
        float32 scalar in ``[0, log K]``.
    """
    p = probs.float()
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1).mean()


def prototype_usage_entropy(probs: Tensor) -> Tensor:
    """Entropy (nats) of the mean distribution over rows: how evenly prototypes are used.

    Args:
        probs: ``(R, K)`` rows of probabilities.

    Returns:
        float32 scalar in ``[0, log K]``.
    """
    mean = probs.float().mean(dim=0)
    return -(mean * torch.log(mean.clamp_min(1e-12))).sum()


def effective_rank(embeddings: Tensor) -> Tensor:
    """RankMe effective rank: ``exp(H(s / sum(s)))`` over the singular values ``s``.

    Args:
        embeddings: ``(R, E)`` embeddings (e.g. CLS tokens of a batch).

    Returns:
        float32 scalar in ``[1, min(R, E)]``; NaN when an embedding is not finite (the SVD would
        fail, and the non-finite loss it comes with is what the run must report).
    """
    if not bool(torch.isfinite(embeddings).all()):
        return torch.tensor(float("nan"))
    s = torch.linalg.svdvals(embeddings.float())
    p = s / s.sum().clamp_min(1e-12) + 1e-7
    return torch.exp(-(p * torch.log(p)).sum())


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` (days prefixed when over 24 h) of a non-negative duration."""
    seconds = max(int(round(seconds)), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


def _against_uniform(name: str, record: Mapping[str, Any]) -> str:
    """``dino 6.12/6.93``: a loss and its uniform value (just the loss when not monitored)."""
    line = record.get(f"{name}_uniform_loss")
    text = f"{name} {record[f'{name}_loss']:.3f}"
    return f"{text}/{line:.3f}" if isinstance(line, float) else text


def progress_line(record: Mapping[str, Any], done: int, total: int) -> str:
    """One readable line of a logging period for ``log.txt``.

    Losses are shown against their uniform values (``dino 6.12/6.93``: what the loss is when
    the student predicts uniformly; a run sitting there has collapsed), ``teacher_entropy``
    against ln K.

    Args:
        record: the period's metrics record (losses, ``epoch``, ``lr``, ``iterations_per_s``,
            optionally the collapse monitors and ``collapse``, the active collapse conditions).
        done: iterations completed.
        total: the run's last iteration.
    """
    parts = [f"it {done}/{total}", f"epoch {record['epoch']:.2f}", f"total_loss {record['total_loss']:.3f}",
             _against_uniform("dino", record), _against_uniform("ibot", record), f"koleo {record['koleo_loss']:.3f}"]
    if "teacher_entropy" in record:
        ln_k = record.get("dino_uniform_loss")  # = ln K of the DINO head
        parts.append(f"teacher_entropy {record['teacher_entropy']:.2f}" + (f"/{ln_k:.2f}" if ln_k else ""))
    speed = float(record.get("iterations_per_s", 0.0))
    parts += [f"lr {record['lr']:.3g}", f"{speed:.2f} it/s"]
    if speed > 0:
        parts.append(f"ETA {format_eta((total - done) / speed)}")
    if record.get("collapse"):
        parts.append(f"collapse: {','.join(record['collapse'])}")
    return "  ".join(parts)


def truncate_metrics(path: str | os.PathLike, first_dropped_iteration: int) -> int:
    """Keep only the lines of iterations before ``first_dropped_iteration``.

    A line cut short by a kill (not valid JSON) is dropped too.

    Args:
        path: the metrics file (nothing happens if it does not exist).
        first_dropped_iteration: the iteration a resumed run restarts at.

    Returns:
        The number of lines kept.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and int(record.get("iteration", -1)) < first_dropped_iteration:
            kept.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in kept))
    return len(kept)


# TensorBoard section of each record key: the tag is "<section>/<key>" (train3d's metrics).
_TB_SECTIONS = {
    "schedule": ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr"),
    "throughput": ("samples_per_s", "iterations_per_s", "data_wait_s", "data_wait_share"),
    "collapse": ("teacher_entropy", "teacher_prototype_entropy", "teacher_cls_effective_rank"),
}


def tensorboard_tag(key: str) -> str:
    """The TensorBoard tag of a metrics-record key: ``loss/dino_loss``, ``schedule/lr``, ``train/grad_norm``...

    Losses and their uniform lines (``*_loss``) go to ``loss``, the scheduled values to
    ``schedule``, speed to ``throughput``, the collapse monitors to ``collapse``, the rest
    (``epoch``, ``grad_norm``) to ``train``.
    """
    if key.endswith("_loss"):
        return f"loss/{key}"
    section = next((name for name, keys in _TB_SECTIONS.items() if key in keys), "train")
    return f"{section}/{key}"


class MetricsLogger:
    """Append one JSON line per logging step (rank 0 only), optionally TensorBoard scalars.

    Args:
        output_dir: the run's folder; the file is ``output_dir/training_metrics.json``.
        start_iteration: first iteration of this (possibly resumed) run; later lines of an
            earlier attempt are dropped (and hidden in TensorBoard).
        enabled: False on ranks other than 0 (every call becomes a no-op).
        tensorboard: also write every number of a record as a scalar under
            ``output_dir/tensorboard`` (:func:`tensorboard_tag`; the number of active collapse
            conditions as ``collapse/active_conditions``). Without the tensorboard package: one
            warning, no events.

    Attributes:
        tensorboard: the run's :class:`~dinov2.utils.tensorboard.TensorBoard` (images go there too).
    """

    def __init__(self, output_dir: str | os.PathLike, start_iteration: int = 0, enabled: bool = True,
                 tensorboard: bool = False) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled
        self.tensorboard = TensorBoard(output_dir, enabled=enabled and tensorboard, setting="train.tensorboard",
                                       purge_step=start_iteration)
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, start_iteration)

    def log(self, iteration: int, values: Mapping[str, Any]) -> None:
        """Write ``{"iteration": iteration, **values}`` as one line (floats rounded to 7 significant digits).

        Args:
            iteration: the iteration the values belong to.
            values: names to numbers (Python or 0-d tensors).
        """
        if not self.enabled:
            return
        record: dict[str, Any] = {"iteration": int(iteration)}
        for key, value in values.items():
            value = value.item() if isinstance(value, Tensor) else value
            record[key] = float(f"{value:.7g}") if isinstance(value, float) and math.isfinite(value) else value
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._log_tensorboard(record)

    def _log_tensorboard(self, record: Mapping[str, Any]) -> None:
        """The record's numbers as scalars at step ``record["iteration"]``."""
        step = record["iteration"]
        for key, value in record.items():
            if key != "iteration":
                self.tensorboard.scalar(tensorboard_tag(key), value, step)
        if isinstance(record.get("collapse"), list):
            self.tensorboard.scalar("collapse/active_conditions", len(record["collapse"]), step)

    def close(self) -> None:
        """Close the TensorBoard event file (the JSON lines are written as they come)."""
        self.tensorboard.close()


class ProgressBar:
    """tqdm bar over the run's iterations with ETA, shown on rank 0 only.

    Args:
        total: the run's last iteration (exclusive).
        initial: iteration the run (re)starts at; the ETA counts only this attempt's speed.
        enabled: show the bar (False on other ranks or when ``train.progress_bar`` is off).
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True) -> None:
        self._bar = tqdm(total=total, initial=initial, disable=not enabled, unit="it", dynamic_ncols=True,
                         desc="pretraining", smoothing=0.05)

    def update(self, postfix: Mapping[str, float | str] | None = None) -> None:
        """Advance by one iteration, optionally showing a few values (e.g. the loss; empty texts are left out)."""
        if postfix:
            shown = {k: v if isinstance(v, str) else f"{v:.4g}" for k, v in postfix.items() if v != ""}
            self._bar.set_postfix(shown, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


class ThroughputMeter:
    """Samples/s and the share of wall time spent waiting for the data loader, per log period."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._start = time.perf_counter()
        self.data_wait = 0.0
        self.samples = 0
        self.iterations = 0

    def add(self, data_wait_s: float, samples: int) -> None:
        """Record one iteration: seconds blocked on the loader and the global samples processed."""
        self.data_wait += data_wait_s
        self.samples += samples
        self.iterations += 1

    def summary(self) -> dict[str, float]:
        """``samples_per_s``, ``iterations_per_s``, ``data_wait_s`` (mean per iteration), ``data_wait_share``."""
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        n = max(self.iterations, 1)
        return {
            "samples_per_s": self.samples / elapsed,
            "iterations_per_s": self.iterations / elapsed,
            "data_wait_s": self.data_wait / n,
            "data_wait_share": self.data_wait / elapsed,
        }
