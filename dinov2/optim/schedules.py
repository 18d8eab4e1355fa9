"""Per-iteration schedules of the pretraining run: LR, weight decay, teacher momentum and temperature.

Every schedule is a :class:`CosineScheduler`, a precomputed numpy array indexed by the global
iteration (values past the end hold the final value, so a resumed or slightly longer run is
safe). :func:`build_schedulers` reads the config and returns all of them; the training loop
calls ``apply_optim_scheduler`` (``dinov2/optim/param_groups.py``) with ``lr[it]``, ``wd[it]``
and ``last_layer_lr[it]`` each iteration.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

SCALING_RULES = ("sqrt_wrt_1024", "none")


class CosineScheduler:
    """Optional freeze (zeros), then linear warm-up, then cosine decay.

    Iterations ``[0, freeze_iters)`` are 0; ``[freeze, freeze + warmup_iters)`` rise linearly
    from ``start_warmup_value`` towards ``base_value`` (reached exactly at the first cosine
    iteration); the remaining ``total_iters - freeze_iters - warmup_iters`` iterations follow
    ``final + (base - final) * (1 + cos(pi * t / n)) / 2``; from ``total_iters`` on the value is
    ``final_value``.

    Args:
        base_value: peak value at the end of warm-up.
        final_value: value at (and after) ``total_iters``.
        total_iters: length of the schedule in iterations (>= freeze_iters + warmup_iters).
        warmup_iters: linear warm-up length.
        start_warmup_value: value at the first warm-up iteration.
        freeze_iters: leading iterations held at 0 (the prototype layer's first epoch).

    Example:
        >>> lr = CosineScheduler(1.0, 0.0, total_iters=10, warmup_iters=2)
        >>> [round(lr[i], 3) for i in (0, 1, 2, 10, 99)]
        [0.0, 0.5, 1.0, 0.0, 0.0]
    """

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0.0,
        freeze_iters: int = 0,
    ) -> None:
        if min(total_iters, warmup_iters, freeze_iters) < 0:
            raise ValueError(
                f"CosineScheduler: total_iters={total_iters}, warmup_iters={warmup_iters} and "
                f"freeze_iters={freeze_iters} must be >= 0 (dinov2/optim/schedules.py)."
            )
        if freeze_iters + warmup_iters > total_iters:
            raise ValueError(
                f"CosineScheduler: freeze_iters ({freeze_iters}) + warmup_iters ({warmup_iters}) exceed "
                f"total_iters ({total_iters}) (dinov2/optim/schedules.py); shorten the warm-up / freeze "
                "epochs or train for more epochs."
            )
        self.base_value = float(base_value)
        self.final_value = float(final_value)
        self.total_iters = int(total_iters)
        freeze = np.zeros(freeze_iters)
        warmup = start_warmup_value + (base_value - start_warmup_value) * np.arange(warmup_iters) / max(warmup_iters, 1)
        n_cosine = total_iters - freeze_iters - warmup_iters
        t = np.arange(n_cosine)
        cosine = final_value + 0.5 * (base_value - final_value) * (1.0 + np.cos(np.pi * t / max(n_cosine, 1)))
        self.schedule = np.concatenate([freeze, warmup, cosine]).astype(np.float64)

    def __getitem__(self, it: int) -> float:
        if it < 0:
            raise IndexError(f"CosineScheduler: iteration must be >= 0, got {it} (dinov2/optim/schedules.py).")
        return float(self.schedule[it]) if it < self.total_iters else self.final_value

    def __len__(self) -> int:
        return self.total_iters

    def __repr__(self) -> str:
        return (
            f"CosineScheduler(base_value={self.base_value}, final_value={self.final_value}, "
            f"total_iters={self.total_iters})"
        )


def scaled_lr(base_lr: float, total_batch_size: int) -> float:
    """Square-root LR scaling: ``base_lr * sqrt(total_batch_size / 1024)``.

    Args:
        base_lr: LR tuned for a global batch of 1024 samples.
        total_batch_size: global batch size (per-process batch x number of processes).
    """
    if total_batch_size < 1:
        raise ValueError(
            f"scaled_lr: total_batch_size must be >= 1, got {total_batch_size} (dinov2/optim/schedules.py)."
        )
    return base_lr * math.sqrt(total_batch_size / 1024.0)


def _get(cfg: Mapping[str, Any], section: str, key: str) -> Any:
    if section not in cfg or cfg[section] is None or key not in cfg[section]:
        raise KeyError(
            f"Config key '{section}.{key}' is missing (needed by dinov2/optim/schedules.py "
            "build_schedulers); add it to your YAML or pass it as an override, e.g. "
            f"{section}.{key}=<value>."
        )
    return cfg[section][key]


def build_schedulers(
    cfg: Mapping[str, Any], iters_per_epoch: int, total_batch_size: int
) -> dict[str, CosineScheduler]:
    """All per-iteration schedules of a pretraining run, from the config.

    Config keys read (all required):

    * ``optim.epochs``: training length; total iterations = epochs * iters_per_epoch.
    * ``optim.base_lr``: peak LR for a global batch of 1024 (scaled by ``optim.scaling_rule``).
    * ``optim.scaling_rule``: ``sqrt_wrt_1024`` (peak = :func:`scaled_lr`) or ``none``
      (peak = base_lr as given).
    * ``optim.min_lr``: final LR of the cosine (not scaled).
    * ``optim.warmup_epochs``: linear LR warm-up from 0.
    * ``optim.weight_decay`` / ``optim.weight_decay_end``: cosine from the first to the second
      (0.04 -> 0.4), no warm-up.
    * ``optim.freeze_last_layer_epochs``: epochs with the prototype layers' LR at 0; their LR
      schedule then follows the same warm-up and cosine, shifted by the frozen epochs.
    * ``teacher.momentum_teacher`` / ``teacher.final_momentum_teacher``: EMA momentum, cosine
      (0.992 -> 1).
    * ``teacher.warmup_teacher_temp`` / ``teacher.teacher_temp``: teacher temperature, linear
      from the first to the second (0.04 -> 0.07) over ``teacher.warmup_teacher_temp_epochs``,
      then constant.

    Args:
        cfg: the full config (DictConfig or nested dict) with ``optim`` and ``teacher`` sections.
        iters_per_epoch: iterations per epoch (the trainer's official epoch length).
        total_batch_size: global batch size, for the LR scaling rule.

    Returns:
        ``{"lr", "wd", "momentum", "teacher_temp", "last_layer_lr"}`` -> :class:`CosineScheduler`.
    """
    if iters_per_epoch < 1:
        raise ValueError(
            f"build_schedulers: iters_per_epoch must be >= 1, got {iters_per_epoch} (dinov2/optim/schedules.py)."
        )
    total = int(_get(cfg, "optim", "epochs")) * iters_per_epoch
    lr_kwargs = _lr_schedule_kwargs(cfg, total, iters_per_epoch, total_batch_size)
    warmup_temp_iters = int(_get(cfg, "teacher", "warmup_teacher_temp_epochs")) * iters_per_epoch
    teacher_temp = float(_get(cfg, "teacher", "teacher_temp"))
    return {
        "lr": CosineScheduler(**lr_kwargs),
        "wd": _cosine_between(cfg, "optim", "weight_decay", "weight_decay_end", total),
        "momentum": _cosine_between(cfg, "teacher", "momentum_teacher", "final_momentum_teacher", total),
        "teacher_temp": CosineScheduler(
            base_value=teacher_temp,
            final_value=teacher_temp,
            total_iters=warmup_temp_iters,
            warmup_iters=warmup_temp_iters,
            start_warmup_value=float(_get(cfg, "teacher", "warmup_teacher_temp")),
        ),
        "last_layer_lr": CosineScheduler(
            **lr_kwargs, freeze_iters=int(_get(cfg, "optim", "freeze_last_layer_epochs")) * iters_per_epoch
        ),
    }


def _peak_lr(cfg: Mapping[str, Any], total_batch_size: int) -> float:
    """``optim.base_lr`` scaled by ``optim.scaling_rule`` for the global batch."""
    rule = _get(cfg, "optim", "scaling_rule")
    if rule not in SCALING_RULES:
        raise ValueError(
            f"optim.scaling_rule='{rule}' is unknown; choose one of {', '.join(SCALING_RULES)} "
            "(dinov2/optim/schedules.py)."
        )
    base_lr = float(_get(cfg, "optim", "base_lr"))
    return scaled_lr(base_lr, total_batch_size) if rule == "sqrt_wrt_1024" else base_lr


def _lr_schedule_kwargs(
    cfg: Mapping[str, Any], total: int, iters_per_epoch: int, total_batch_size: int
) -> dict[str, Any]:
    """:class:`CosineScheduler` arguments of the LR: warm-up from 0, cosine to ``optim.min_lr``.

    The prototype layers' schedule reuses them with its frozen epochs added.
    """
    return dict(
        base_value=_peak_lr(cfg, total_batch_size),
        final_value=float(_get(cfg, "optim", "min_lr")),
        total_iters=total,
        warmup_iters=int(_get(cfg, "optim", "warmup_epochs")) * iters_per_epoch,
        start_warmup_value=0.0,
    )


def _cosine_between(cfg: Mapping[str, Any], section: str, start_key: str, end_key: str, total: int) -> CosineScheduler:
    """A cosine without warm-up from ``cfg[section][start_key]`` to ``cfg[section][end_key]`` over ``total``."""
    return CosineScheduler(
        base_value=float(_get(cfg, section, start_key)),
        final_value=float(_get(cfg, section, end_key)),
        total_iters=total,
    )
