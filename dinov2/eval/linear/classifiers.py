"""A grid of linear classifiers on cached frozen features, trained together and selected on validation.

Each head has its own feature recipe and learning rate:

* ``n_blocks``: the CLS tokens of the last 1 (or 4, ...) blocks, concatenated;
* ``pooling``: ``cls`` alone; ``cls_avgpool``: also the mean of the last block's patch tokens (DINOv2's
  linear evaluation); ``cls_avgpool_blocks``: the CLS and the mean patch token of each of the
  ``n_blocks`` blocks (what ``python -m dinov2.eval.evidence`` reads: at small scale the earlier
  blocks' mean patch tokens carry what pretraining learned, see
  docs/experiments/small_scale_recipe.md);
* ``lr``: peak learning rate of SGD with momentum, decayed to 0 on a cosine over the run.

Every head standardises its input with the training features' per-dimension mean and standard
deviation (fixed buffers), so one learning-rate grid suits backbones of any width and output
scale. All heads see the same mini-batches; one backward pass trains them all (their
parameters are disjoint, so summing their losses leaves each gradient unchanged).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.optim.schedules import CosineScheduler

from .features import FeatureSet
from .metrics import confusion_matrix

logger = logging.getLogger(__name__)

POOLINGS = ("cls", "cls_avgpool", "cls_avgpool_blocks")


@dataclass(frozen=True)
class ProbeSetup:
    """Feature recipe and learning rate of one head."""

    n_blocks: int
    pooling: str
    lr: float

    def __post_init__(self):
        if self.n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {self.n_blocks}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")

    @property
    def name(self) -> str:
        return f"blocks{self.n_blocks}_{self.pooling}_lr{self.lr:g}"

    @property
    def features_key(self) -> str:
        return f"blocks{self.n_blocks}_{self.pooling}"


def setup_grid(n_blocks: Sequence[int], poolings: Sequence[str], learning_rates: Sequence[float]) -> list[ProbeSetup]:
    """Every combination, in the order blocks, pooling, learning rate."""
    if not n_blocks or not poolings or not learning_rates:
        raise ValueError("The grid needs at least one n_blocks, one pooling and one learning rate "
                         f"(got {list(n_blocks)}, {list(poolings)}, {list(learning_rates)})")
    return [ProbeSetup(int(n), str(p), float(lr)) for n in n_blocks for p in poolings for lr in learning_rates]


def linear_input(cls_tokens: torch.Tensor, patch_mean: torch.Tensor, n_blocks: int, pooling: str) -> torch.Tensor:
    """Concatenate the features one head reads.

    Args:
        cls_tokens: ``(B, K, E)`` CLS tokens of the last ``K >= n_blocks`` blocks.
        patch_mean: ``(B, K, E)`` mean patch token of the same blocks.
        n_blocks: trailing blocks to use.
        pooling: one of :data:`POOLINGS`.

    Returns:
        ``(B, n_blocks * E)`` (``cls``), ``(B, (n_blocks + 1) * E)`` (``cls_avgpool``) or
        ``(B, 2 * n_blocks * E)`` (``cls_avgpool_blocks``).
    """
    if n_blocks > cls_tokens.shape[1]:
        raise ValueError(f"A head wants the last {n_blocks} blocks but only {cls_tokens.shape[1]} were extracted")
    x = cls_tokens[:, -n_blocks:].flatten(1)
    if pooling == "cls_avgpool":
        x = torch.cat([x, patch_mean[:, -1]], dim=1)
    elif pooling == "cls_avgpool_blocks":
        x = torch.cat([x, patch_mean[:, -n_blocks:].flatten(1)], dim=1)
    return x


class LinearProbe(nn.Module):
    """Standardise (fixed statistics), then one linear layer.

    Args:
        mean, std: ``(D,)`` training-feature statistics.
        num_classes: outputs ``C``.

    Shapes: ``(B, D)`` → ``(B, C)``.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float().clamp_min(1e-6))
        self.linear = nn.Linear(mean.numel(), num_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.std)


class ProbeGrid(nn.Module):
    """All heads of the grid.

    Args:
        setups: one :class:`ProbeSetup` per head.
        train: training features (their statistics standardise each head's input).
        num_classes: outputs per head.
    """

    def __init__(self, setups: Sequence[ProbeSetup], train: FeatureSet, num_classes: int):
        super().__init__()
        names = [s.name for s in setups]
        if len(set(names)) != len(names):
            raise ValueError(f"Duplicate heads in the grid: {names}")
        self.setups = list(setups)
        heads = []
        stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for s in self.setups:
            if s.features_key not in stats:
                x = linear_input(train.cls_tokens, train.patch_mean, s.n_blocks, s.pooling)
                stats[s.features_key] = (x.mean(dim=0), x.std(dim=0))
            heads.append(LinearProbe(*stats[s.features_key], num_classes))
        self.heads = nn.ModuleList(heads)
        self.index = {name: i for i, name in enumerate(names)}

    def head(self, name: str) -> LinearProbe:
        """The head of a setup, by :attr:`ProbeSetup.name`."""
        return self.heads[self.index[name]]

    def forward(self, cls_tokens: torch.Tensor, patch_mean: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, K, E)``, ``(B, E)`` → head name → logits ``(B, C)``."""
        inputs: dict[str, torch.Tensor] = {}
        out = {}
        for s in self.setups:
            if s.features_key not in inputs:
                inputs[s.features_key] = linear_input(cls_tokens, patch_mean, s.n_blocks, s.pooling)
            out[s.name] = self.head(s.name)(inputs[s.features_key])
        return out

    def param_groups(self, weight_decay: float) -> list[dict]:
        """One optimiser group per head with its own peak learning rate (``base_lr``)."""
        return [{"params": list(self.head(s.name).parameters()), "base_lr": s.lr, "lr": s.lr,
                 "weight_decay": weight_decay, "name": s.name} for s in self.setups]


@dataclass
class HeadRecord:
    """Best validation result of one head over the evaluations of a run."""

    setup: ProbeSetup
    val_accuracy: float = -1.0
    val_balanced_accuracy: float = -1.0
    iteration: int = -1
    state: dict = field(default_factory=dict, repr=False)


@dataclass
class GridResult:
    """Outcome of :func:`train_probe_grid`.

    Attributes:
        records: head name → its best :class:`HeadRecord`.
        best: the selected head's record.
        history: one dict per evaluation: ``iteration``, ``train_loss`` (mean over heads since the
            last evaluation), ``train_loss_per_head`` and ``val_accuracy`` (head name → value).
        iterations: iterations run.
    """

    records: dict[str, HeadRecord]
    best: HeadRecord
    history: list[dict]
    iterations: int


@torch.no_grad()
def predict(grid: ProbeGrid, features: FeatureSet, batch_size: int = 1024) -> dict[str, torch.Tensor]:
    """Logits of every head on a split: head name → ``(N, C)``."""
    grid.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(features), batch_size):
        sl = slice(start, start + batch_size)
        for name, logits in grid(features.cls_tokens[sl], features.patch_mean[sl]).items():
            parts.setdefault(name, []).append(logits)
    return {name: torch.cat(p) for name, p in parts.items()}


def _accuracies(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """Accuracy and balanced accuracy (the cheap part of :func:`classification_metrics`)."""
    matrix = confusion_matrix(logits.argmax(dim=1), labels, num_classes)
    support = matrix.sum(dim=1)
    present = support > 0
    recall = matrix.diagonal()[present].float() / support[present].float()
    return float(matrix.diagonal().sum()) / max(int(labels.numel()), 1), float(recall.mean())


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless mini-batches of indices: successive random permutations of ``range(n)``."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]


@contextlib.contextmanager
def _one_thread():
    """Run on one CPU thread: the heads' matrix products are so small that waking further threads
    costs more than the work (measured 20x slower with 2 threads on a busy 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_probe_grid(grid: ProbeGrid, train: FeatureSet, val: FeatureSet, *, epochs: int, epoch_length: int | None,
                     batch_size: int, eval_period_iterations: int | None, momentum: float = 0.9,
                     weight_decay: float = 0.0, seed: int = 0,
                     on_eval: Callable[[dict], None] | None = None) -> GridResult:
    """Train every head on the training features; keep each head's best state on validation.

    Args:
        grid: the heads.
        train, val: cached features (validation must not be empty: it selects the head).
        epochs: passes of ``epoch_length`` iterations.
        epoch_length: iterations per epoch; None = one pass over the training features.
        batch_size: mini-batch size (capped at the training-set size).
        eval_period_iterations: validate every so many iterations (None: once per epoch); the
            last iteration is always validated.
        momentum, weight_decay: of SGD.
        seed: mini-batch order.
        on_eval: called with each evaluation's record (for logging to a file).

    Returns:
        :class:`GridResult`. The best head has the highest validation accuracy; ties go to the
        higher balanced accuracy, then to the earlier head of the grid.
    """
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"Training ({len(train)}) and validation ({len(val)}) features must both be non-empty: "
                         "the validation split selects the classifier.")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    batch_size = min(batch_size, len(train))
    epoch_length = epoch_length or math.ceil(len(train) / batch_size)
    if epoch_length < 1:
        raise ValueError(f"epoch_length must be >= 1, got {epoch_length}")
    total = epochs * epoch_length
    period = eval_period_iterations or epoch_length
    if period < 1:
        raise ValueError(f"eval_period_iterations must be >= 1, got {period}")
    optimizer = torch.optim.SGD(grid.param_groups(weight_decay), lr=0.0, momentum=momentum)
    schedule = CosineScheduler(1.0, 0.0, total_iters=total)
    generator = torch.Generator().manual_seed(seed)
    records = {s.name: HeadRecord(s) for s in grid.setups}
    batches = _batches(len(train), batch_size, generator)
    with _one_thread():
        history = _train_loop(grid, train, val, optimizer, schedule, batches, records, total, period, on_eval)
    order = {s.name: i for i, s in enumerate(grid.setups)}
    best = max(records.values(), key=lambda r: (r.val_accuracy, r.val_balanced_accuracy, -order[r.setup.name]))
    return GridResult(records, best, history, total)


def _train_loop(grid: ProbeGrid, train: FeatureSet, val: FeatureSet, optimizer: torch.optim.Optimizer,
                schedule: CosineScheduler, batches, records: dict[str, HeadRecord], total: int, period: int,
                on_eval: Callable[[dict], None] | None) -> list[dict]:
    num_classes = grid.heads[0].linear.out_features
    history: list[dict] = []
    running, seen = 0.0, 0
    per_head = torch.zeros(len(grid.setups))  # each head's loss summed since the last evaluation
    for iteration in range(1, total + 1):
        grid.train()
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * schedule[iteration - 1]
        index = next(batches)
        logits = grid(train.cls_tokens[index], train.patch_mean[index])
        target = train.labels[index]
        losses = torch.stack([F.cross_entropy(out, target) for out in logits.values()])
        loss = losses.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += loss.item() / len(logits)
        per_head += losses.detach()
        seen += 1
        if iteration % period == 0 or iteration == total:
            val_logits = predict(grid, val)
            entry = {"iteration": iteration, "train_loss": running / seen,
                     "train_loss_per_head": dict(zip(logits, (per_head / seen).tolist())), "val_accuracy": {}}
            for name, out in val_logits.items():
                accuracy, balanced = _accuracies(out, val.labels, num_classes)
                entry["val_accuracy"][name] = accuracy
                record = records[name]
                if accuracy > record.val_accuracy:
                    record.val_accuracy = accuracy
                    record.val_balanced_accuracy = balanced
                    record.iteration = iteration
                    record.state = copy.deepcopy(grid.head(name).state_dict())
            history.append(entry)
            best_now = max(entry["val_accuracy"].items(), key=lambda kv: kv[1])
            logger.info("iteration %d/%d: training loss %.4f, best validation accuracy %.4f (%s)",
                        iteration, total, entry["train_loss"], best_now[1], best_now[0])
            if on_eval is not None:
                on_eval(entry)
            running, seen = 0.0, 0
            per_head.zero_()
    return history


def best_head_logits(grid: ProbeGrid, record: HeadRecord, features: FeatureSet) -> torch.Tensor:
    """Logits ``(N, C)`` of a head restored to its recorded best state."""
    head = copy.deepcopy(grid.head(record.setup.name))
    head.load_state_dict(record.state)
    head.eval()
    with torch.no_grad():
        x = linear_input(features.cls_tokens, features.patch_mean, record.setup.n_blocks, record.setup.pooling)
        return head(x)
