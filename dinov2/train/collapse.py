"""Collapse watch: warn when the logged monitors say a run has collapsed, and say what to change.

Self-distillation has two ways to fail that the monitors of :mod:`dinov2.train.metrics` show
(K = ``dino.head_n_prototypes``):

* uniform collapse: the teacher's distribution goes flat (``teacher_entropy`` -> ln K) and the
  student follows, so the DINO / iBOT losses sit at their uniform values (``dino_uniform_loss``
  = ln K, ``ibot_uniform_loss``: what each loss is when the student predicts uniformly);
* dominant collapse: one prototype takes every sample (``teacher_prototype_entropy`` -> 0), or
  every crop maps to one direction (``teacher_cls_effective_rank`` -> 1).

:class:`CollapseWatch` reads each logged record (a line of ``training_metrics.json``). A
condition that holds for ``patience_periods`` consecutive logging periods after the warm-up
raises one warning (logged, with the likely causes and the config keys to change); it clears,
with an INFO line, after as many periods without it. Settings: ``train.collapse_watch`` in
``dinov2/configs/ssl3d_default_config.yaml``.

Example:
    >>> watch = CollapseWatch.from_config(cfg)
    >>> for record in records:             # one per logging period
    ...     raised = watch.update(record)  # warnings that started at this period
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from dinov2.utils.errors import UserError

logger = logging.getLogger(__name__)

# Config values the advice quotes, by their dotted key (so every message names the key to change).
FACT_KEYS = (
    "dino.head_n_prototypes", "ibot.head_n_prototypes", "dino.koleo_loss_weight", "train.batch_size_per_gpu",
    "train.iterations_per_epoch", "centering.kind", "optim.base_lr", "optim.scaling_rule", "optim.warmup_epochs",
    "optim.freeze_last_layer_epochs", "teacher.teacher_temp", "teacher.warmup_teacher_temp",
    "teacher.warmup_teacher_temp_epochs", "teacher.momentum_teacher", "student.layerscale",
)
# With fewer samples per process the CLS effective rank (of 2 x batch rows) says little.
MIN_BATCH_FOR_RANK = 4
# An epoch-counted schedule shorter than this many iterations is named as a likely cause; the
# recipe's own (10 warm-up epochs of 1250 iterations) are far longer.
SHORT_SCHEDULE_ITERATIONS = 100


class CollapseError(UserError, RuntimeError):
    """The run stopped because the collapse watch raised a warning and ``train.collapse_watch.stop_run`` is true."""


@dataclass(frozen=True)
class WatchSettings:
    """Thresholds of :class:`CollapseWatch` (``train.collapse_watch``; the YAML explains each key).

    Attributes:
        warmup_iterations: records of the first iterations, up to this many, are ignored.
        patience_periods: consecutive logging periods a condition must hold to warn (and be
            gone to clear).
        teacher_entropy_fraction: uniform teacher when ``teacher_entropy >= this * ln K``.
        uniform_loss_tolerance: a loss is at its uniform value within this relative distance.
        prototype_entropy_fraction: one prototype dominates when
            ``teacher_prototype_entropy <= this * ln K``.
        min_cls_effective_rank: rank collapse when ``teacher_cls_effective_rank <= this``.
        stop_run: raise :class:`CollapseError` after a warning.
    """

    warmup_iterations: int = 0
    patience_periods: int = 5
    teacher_entropy_fraction: float = 0.95
    uniform_loss_tolerance: float = 0.02
    prototype_entropy_fraction: float = 0.05
    min_cls_effective_rank: float = 1.5
    stop_run: bool = False

    def __post_init__(self) -> None:
        checks = (
            ("warmup_periods", self.warmup_iterations >= 0, "must be >= 0"),
            ("patience_periods", self.patience_periods >= 1, "must be >= 1"),
            ("teacher_entropy_fraction", 0 < self.teacher_entropy_fraction <= 1, "must lie in (0, 1]"),
            ("uniform_loss_tolerance", self.uniform_loss_tolerance >= 0, "must be >= 0"),
            ("prototype_entropy_fraction", 0 <= self.prototype_entropy_fraction < 1, "must lie in [0, 1)"),
        )
        for key, ok, rule in checks:
            if not ok:
                raise ValueError(f"train.collapse_watch.{key} {rule}; got the settings {self}.")


@dataclass(frozen=True)
class CollapseWarning:
    """One condition that started at a logging period.

    Attributes:
        condition: its name, e.g. ``dino_uniform`` (the names listed in the metrics record).
        short: a few characters for the progress bar, e.g. ``dino@lnK``.
        message: one line: what was seen (values, ln K), likely causes, config keys to change.
    """

    condition: str
    short: str
    message: str


# ----------------------------------------------------------------------------- the conditions
# A condition's test: (record, settings, facts) -> (holds, what was seen), or None when the record
# lacks its inputs. A cause: (facts, record) -> one clause of advice, or None when it does not apply.
Check = Callable[[Mapping[str, Any], WatchSettings, Mapping[str, Any]], "tuple[bool, str] | None"]
Cause = Callable[[Mapping[str, Any], Mapping[str, Any]], "str | None"]


def _number(record: Mapping[str, Any], key: str) -> float | None:
    value = record.get(key)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _teacher_uniform(record, settings, facts):
    entropy, k = _number(record, "teacher_entropy"), int(facts["dino.head_n_prototypes"])
    if entropy is None:
        return None
    bound = settings.teacher_entropy_fraction * math.log(k)
    seen = (f"teacher_entropy {entropy:.3f} against ln K = {math.log(k):.3f} (dino.head_n_prototypes={k}; "
            f"flat from {bound:.3f} = {settings.teacher_entropy_fraction:g} ln K)")
    return entropy >= bound, seen


def _loss_at_uniform(head: str) -> Check:
    def check(record, settings, facts):
        loss, line = _number(record, f"{head}_loss"), _number(record, f"{head}_uniform_loss")
        if loss is None or line is None or line <= 0:  # 0: no masked crop in the batch (iBOT)
            return None
        k = int(facts[f"{head}.head_n_prototypes"])
        what = "= ln K" if head == "dino" else f"ln K = {math.log(k):.3f} x the share of masked crops"
        seen = (f"{head}_loss {loss:.3f} against its uniform value {line:.3f} ({what}, {head}.head_n_prototypes={k}; "
                f"flat within {settings.uniform_loss_tolerance:.0%})")
        return abs(loss - line) <= settings.uniform_loss_tolerance * line, seen

    return check


def _dominant_prototype(record, settings, facts):
    entropy, k = _number(record, "teacher_prototype_entropy"), int(facts["dino.head_n_prototypes"])
    if entropy is None:
        return None
    bound = settings.prototype_entropy_fraction * math.log(k)
    seen = (f"teacher_prototype_entropy {entropy:.3f} against ln K = {math.log(k):.3f} (dino.head_n_prototypes={k}; "
            f"one prototype dominates below {bound:.3f} = {settings.prototype_entropy_fraction:g} ln K)")
    return entropy <= bound, seen


def _cls_rank(record, settings, facts):
    rank, batch = _number(record, "teacher_cls_effective_rank"), int(facts["train.batch_size_per_gpu"])
    if rank is None or batch < MIN_BATCH_FOR_RANK:
        return None
    seen = (f"teacher_cls_effective_rank {rank:.2f} (collapsed at or below {settings.min_cls_effective_rank:g}; "
            f"{2 * batch} CLS tokens per process): the teacher maps every crop to nearly one direction")
    return rank <= settings.min_cls_effective_rank, seen


# ----------------------------------------------------------------------------- the advice
def _global_batch(facts) -> int:
    return int(facts["train.batch_size_per_gpu"]) * int(facts["world_size"])


def _sinkhorn(head: str) -> Cause:
    def cause(facts, record):
        if facts["centering.kind"] != "sinkhorn_knopp":
            return None
        k, b, world = int(facts[f"{head}.head_n_prototypes"]), facts["train.batch_size_per_gpu"], facts["world_size"]
        if head == "ibot":
            # Its rows are the batch's masked patches, a number the config does not fix.
            return (f"too few masked patches per batch for ibot.head_n_prototypes={k} under Sinkhorn-Knopp, which "
                    "spreads each batch over all K prototypes (a target is no sharper than ln(K / masked patches)): "
                    f"raise train.batch_size_per_gpu (now {b} x {world} process(es)) or ibot.mask_sample_probability, "
                    "or lower ibot.head_n_prototypes")
        rows = 2 * _global_batch(facts)  # two global crops per sample
        if k <= rows:
            return None
        return (f"too few samples per batch for the prototypes under Sinkhorn-Knopp: it spreads each batch of {rows} "
                f"teacher rows over all K={k} prototypes, so a per-sample target cannot be sharper than about "
                f"ln(K / rows) = {math.log(k / rows):.2f} nats of ln K = {math.log(k):.2f}: raise "
                f"train.batch_size_per_gpu (now {b} x {world} process(es)) or lower dino.head_n_prototypes / "
                "ibot.head_n_prototypes")

    return cause


def _lr(facts, record):
    lr, rule = _number(record, "lr"), facts["optim.scaling_rule"]
    now = f"lr {lr:.3g} now, " if lr is not None else ""
    fix = "lower optim.base_lr" + (" or use optim.scaling_rule=sqrt_wrt_1024" if rule == "none" else "")
    return (f"learning rate too high for the batch ({now}optim.base_lr={facts['optim.base_lr']} with "
            f"optim.scaling_rule={rule} for a global batch of {_global_batch(facts)}): {fix}")


def _temperature(direction: str) -> Cause:
    effect = "flattens the targets" if direction == "high" else "puts every target on one prototype"

    def cause(facts, record):
        temp = _number(record, "teacher_temp")
        now = f"{temp:.3g} now, " if temp is not None else ""
        return (f"teacher temperature too {direction} ({now}teacher.warmup_teacher_temp="
                f"{facts['teacher.warmup_teacher_temp']} -> teacher.teacher_temp={facts['teacher.teacher_temp']} over "
                f"teacher.warmup_teacher_temp_epochs={facts['teacher.warmup_teacher_temp_epochs']}): a too {direction} "
                f"one {effect}; DINO uses 0.04 -> 0.07")

    return cause


def _ema(facts, record):
    momentum = _number(record, "momentum")
    now = f"{momentum:.4g} now, " if momentum is not None else ""
    return (f"EMA momentum ({now}teacher.momentum_teacher={facts['teacher.momentum_teacher']}): a low one lets the "
            "teacher follow a collapsing student, raise it towards 0.996")


def _epochs(facts, record):
    n = int(facts["train.iterations_per_epoch"])
    keys = ("optim.warmup_epochs", "optim.freeze_last_layer_epochs", "teacher.warmup_teacher_temp_epochs")
    lengths = {key: float(facts[key]) * n for key in keys}
    if min(lengths.values()) >= SHORT_SCHEDULE_ITERATIONS:
        return None
    parts = [f"{key}={facts[key]} ({length:g} iterations)" for key, length in lengths.items()]
    return (f"schedules counted in epochs are short in iterations (train.iterations_per_epoch={n}: {', '.join(parts)}): "
            "raise them or train.iterations_per_epoch")


def _layerscale(facts, record):
    value = facts.get("student.layerscale")
    if value is None or float(value) > 1e-3:
        return None
    # docs/experiments/small_scale_recipe.md: at 1e-5 the CLS token is the same for every input at
    # the start, the targets are flat, and a short run flattens its head before the features move.
    return (f"LayerScale starts the blocks as near-identities (student.layerscale={value}): the CLS token is then "
            "almost the same for every input and the targets flat; the published recipe relies on long warm-ups "
            "(12,500 iterations) to get out of it; a short run learns with student.layerscale=null")


def _koleo(facts, record):
    return (f"too little KoLeo (dino.koleo_loss_weight={facts['dino.koleo_loss_weight']}), the term that pushes "
            "the student's CLS tokens apart: raise it")


@dataclass(frozen=True)
class _Condition:
    name: str
    short: str
    meaning: str
    check: Check
    causes: tuple[Cause, ...]


CONDITIONS = (
    _Condition("teacher_uniform", "teacher@lnK", "the teacher gives every sample a near-flat distribution",
               _teacher_uniform, (_layerscale, _sinkhorn("dino"), _temperature("high"), _epochs, _ema)),
    _Condition("dino_uniform", "dino@lnK", "the student predicts a flat distribution on CLS tokens",
               _loss_at_uniform("dino"), (_layerscale, _sinkhorn("dino"), _temperature("high"), _lr, _epochs)),
    _Condition("ibot_uniform", "ibot@lnK", "the student predicts a flat distribution on masked patches",
               _loss_at_uniform("ibot"), (_sinkhorn("ibot"), _temperature("high"), _lr, _epochs)),
    _Condition("dominant_prototype", "proto@0", "one prototype takes almost every sample",
               _dominant_prototype, (_lr, _temperature("low"), _ema, _epochs)),
    _Condition("cls_rank", "rank@1", "the representation does not tell crops apart",
               _cls_rank, (_lr, _ema, _koleo, _epochs)),
)


# ----------------------------------------------------------------------------- the watch
@dataclass
class _State:
    hits: int = 0          # consecutive periods the condition held
    misses: int = 0        # consecutive periods it did not
    active: bool = False   # warned and not cleared yet
    since: int = 0         # completed iterations at the start of the current streak


@dataclass
class CollapseWatch:
    """Feed it each logged record; it returns the collapse warnings that start there.

    Args:
        settings: thresholds and patience.
        facts: config values the advice quotes (:data:`FACT_KEYS`, dotted) and ``world_size``.

    Attributes:
        cleared: names of the conditions that cleared at the last :meth:`update`.
    """

    settings: WatchSettings
    facts: Mapping[str, Any]
    cleared: list[str] = field(default_factory=list, init=False)
    _states: dict[str, _State] = field(default_factory=lambda: {c.name: _State() for c in CONDITIONS}, init=False,
                                       repr=False)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], world_size: int = 1) -> "CollapseWatch":
        """The watch ``train.collapse_watch`` describes (its ``enabled`` key is the caller's to read).

        ``warmup_periods: null`` watches from the end of the LR warm-up (``optim.warmup_epochs``):
        before it the losses sit near their uniform values in a healthy run too.
        """
        w = cfg["train"]["collapse_watch"]
        if w["warmup_periods"] is None:
            warmup = round(float(cfg["optim"]["warmup_epochs"]) * int(cfg["train"]["iterations_per_epoch"]))
        else:
            warmup = int(w["warmup_periods"]) * int(cfg["train"]["log_period_iterations"])
        settings = WatchSettings(
            warmup_iterations=warmup, patience_periods=int(w["patience_periods"]),
            teacher_entropy_fraction=float(w["teacher_entropy_fraction"]),
            uniform_loss_tolerance=float(w["uniform_loss_tolerance"]),
            prototype_entropy_fraction=float(w["prototype_entropy_fraction"]),
            min_cls_effective_rank=float(w["min_cls_effective_rank"]), stop_run=bool(w["stop_run"]))
        facts: dict[str, Any] = {"world_size": int(world_size)}
        for key in FACT_KEYS:
            section, name = key.split(".")
            facts[key] = cfg[section][name]
        return cls(settings, facts)

    @property
    def active(self) -> list[str]:
        """Names of the conditions warned about and not cleared, in :data:`CONDITIONS` order."""
        return [c.name for c in CONDITIONS if self._states[c.name].active]

    @property
    def active_short(self) -> str:
        """The active conditions for a progress bar, e.g. ``teacher@lnK,dino@lnK`` ('' when none)."""
        return ",".join(c.short for c in CONDITIONS if self._states[c.name].active)

    def update(self, record: Mapping[str, Any]) -> list[CollapseWarning]:
        """Check one logged record; log and return the warnings that start at it.

        Args:
            record: a line of ``training_metrics.json``: ``iteration`` (0-based index of the
                period's last iteration) and any of the monitors and losses; a condition whose
                inputs are missing or not finite is skipped (its streak neither grows nor breaks).

        Returns:
            The conditions that reached ``patience_periods`` at this record (each once until it
            clears). Clearing conditions are listed in :attr:`cleared` and logged at INFO.
        """
        done = int(record["iteration"]) + 1
        self.cleared = []
        if done <= self.settings.warmup_iterations:
            return []
        raised = []
        for condition in CONDITIONS:
            result = condition.check(record, self.settings, self.facts)
            if result is not None:
                warning = self._step(condition, *result, done, record)
                if warning is not None:
                    raised.append(warning)
        return raised

    def _step(self, condition: _Condition, hit: bool, seen: str, done: int,
              record: Mapping[str, Any]) -> CollapseWarning | None:
        state, patience = self._states[condition.name], self.settings.patience_periods
        if hit:
            state.since = state.since if state.hits else done
            state.hits, state.misses = state.hits + 1, 0
            if not state.active and state.hits >= patience:
                state.active = True
                message = self._message(condition, seen, state.since, done, record)
                logger.warning("%s", message)
                return CollapseWarning(condition.name, condition.short, message)
            return None
        state.hits, state.misses = 0, state.misses + 1
        if state.active and state.misses >= patience:
            state.active = False
            self.cleared.append(condition.name)
            logger.info("Collapse condition %s cleared after %d iterations: %s", condition.name, done, seen)
        return None

    def _message(self, condition: _Condition, seen: str, since: int, done: int, record: Mapping[str, Any]) -> str:
        causes = [text for cause in condition.causes if (text := cause(self.facts, record))]
        numbered = "; ".join(f"({i}) {text}" for i, text in enumerate(causes, 1))
        periods = self.settings.patience_periods
        stop = ("the run stops here (train.collapse_watch.stop_run=true)" if self.settings.stop_run
                else "train.collapse_watch.stop_run=true stops a run at such a warning")
        return (f"Collapse warning [{condition.name}] after {done} iterations: {condition.meaning}: {seen}, for "
                f"{periods} logging period(s) since iteration {since}. Likely causes: {numbered}. Thresholds: "
                f"train.collapse_watch.*; {stop}.")

    def stop_message(self, raised: list[CollapseWarning], done: int) -> str:
        """The :class:`CollapseError` text for warnings raised after ``done`` iterations."""
        names = ", ".join(w.condition for w in raised)
        return (f"Collapse [{names}] after {done} iterations and train.collapse_watch.stop_run=true: the run "
                "stopped (the warning above says what to change); train.collapse_watch.stop_run=false keeps going.")
