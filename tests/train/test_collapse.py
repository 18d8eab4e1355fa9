"""The collapse watch: conditions on synthetic records, and a real tiny run forced to collapse.

Also the readable progress of log.txt (one line per logging period, teacher exports).
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import pytest

from dinov2.checkpoints.training_state import TrainingCheckpointer
from dinov2.train import train3d
from dinov2.train.collapse import CONDITIONS, CollapseWatch, WatchSettings
from dinov2.train.metrics import ProgressBar, progress_line

LN_K = math.log(1024)  # dino.head_n_prototypes = ibot.head_n_prototypes of configs/tiny_cpu.yaml
IBOT_LINE = 0.5 * LN_K

HEALTHY = {"dino_loss": 5.0, "dino_uniform_loss": LN_K, "ibot_loss": 2.0, "ibot_uniform_loss": IBOT_LINE,
           "teacher_entropy": 3.0, "teacher_prototype_entropy": 2.5, "teacher_cls_effective_rank": 4.0,
           "lr": 1e-3, "teacher_temp": 0.04, "momentum": 0.992}
# One collapsed variant per condition: the change that puts the record over that threshold only.
COLLAPSED = {
    "teacher_uniform": {"teacher_entropy": 0.97 * LN_K},
    "dino_uniform": {"dino_loss": 1.01 * LN_K},
    "ibot_uniform": {"ibot_loss": 0.99 * IBOT_LINE},
    "dominant_prototype": {"teacher_prototype_entropy": 0.01},
    "cls_rank": {"teacher_cls_effective_rank": 1.1},
}


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "training_metrics.json").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_cfg(tiny_config):
    return train3d.build_config(str(tiny_config), ["train.datalist=x.json"])


def _watch(cfg, batch: int = 4, **settings) -> CollapseWatch:
    facts = dict(CollapseWatch.from_config(cfg).facts, **{"train.batch_size_per_gpu": batch})
    return CollapseWatch(WatchSettings(**settings), facts)


def _feed(watch: CollapseWatch, records: list[dict], start: int = 0) -> list[list[str]]:
    """The names raised at each record; ``iteration`` = position + start (one iteration per period)."""
    return [[w.condition for w in watch.update({"iteration": start + i, **r})] for i, r in enumerate(records)]


# ----------------------------------------------------------------------------- unit: the watch
def test_every_collapsed_variant_is_covered():
    assert set(COLLAPSED) == {c.name for c in CONDITIONS}


@pytest.mark.parametrize("name", sorted(COLLAPSED))
def test_condition_fires_after_patience_once_then_clears(tiny_cfg, name, caplog):
    watch = _watch(tiny_cfg, warmup_iterations=2, patience_periods=3)
    bad, good = {**HEALTHY, **COLLAPSED[name]}, HEALTHY
    with caplog.at_level(logging.INFO, logger="dinov2.train.collapse"):
        # 2 warm-up periods (ignored although collapsed), 2 under patience, the 3rd warns, then no repeat.
        raised = _feed(watch, [bad] * 9)
        assert raised == [[]] * 4 + [[name]] + [[]] * 4
        assert watch.active == [name]
        # It clears after as many healthy periods as the patience, with an INFO line.
        assert _feed(watch, [good] * 3, start=9) == [[]] * 3
        assert watch.cleared == [name] and watch.active == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"Collapse warning [{name}] after 5 iterations" in warnings[0].getMessage()
    assert "since iteration 3" in warnings[0].getMessage()
    assert any(f"{name} cleared after 12 iterations" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    # Collapsing again warns again, after the full patience.
    assert _feed(watch, [bad] * 3, start=12) == [[], [], [name]]


def test_healthy_and_interrupted_sequences_raise_nothing(tiny_cfg):
    watch = _watch(tiny_cfg, warmup_iterations=0, patience_periods=3)
    assert _feed(watch, [HEALTHY] * 20) == [[]] * 20
    # A streak broken before the patience starts again from zero.
    flapping = [{**HEALTHY, **COLLAPSED["dino_uniform"]}] * 2 + [HEALTHY]
    assert _feed(watch, flapping * 4, start=20) == [[]] * 12 and watch.active == []


def test_skipped_records_neither_count_nor_break_a_streak(tiny_cfg):
    watch = _watch(tiny_cfg, warmup_iterations=0, patience_periods=2)
    bad = {**HEALTHY, **COLLAPSED["ibot_uniform"]}
    no_mask = {**HEALTHY, "ibot_loss": 0.0, "ibot_uniform_loss": 0.0}  # no masked crop: iBOT not checkable
    assert _feed(watch, [bad, no_mask, no_mask, bad]) == [[], [], [], ["ibot_uniform"]]
    # Monitors off (train.monitor_collapse=false): nothing to check, nothing raised.
    losses_only = {"dino_loss": LN_K, "ibot_loss": IBOT_LINE}
    assert _feed(_watch(tiny_cfg, patience_periods=1), [losses_only] * 3) == [[]] * 3


def test_cls_rank_is_not_checked_below_4_samples_per_process(tiny_cfg):
    bad = {**HEALTHY, **COLLAPSED["cls_rank"]}
    assert _feed(_watch(tiny_cfg, batch=2, patience_periods=1), [bad] * 3) == [[]] * 3
    assert _feed(_watch(tiny_cfg, batch=2, patience_periods=1, min_cls_effective_rank=0.0), [bad]) == [[]]


def test_messages_name_values_causes_and_keys(tiny_cfg):
    watch = _watch(tiny_cfg, patience_periods=1)
    record = {"iteration": 19, **HEALTHY, **COLLAPSED["dino_uniform"], **COLLAPSED["teacher_uniform"]}
    raised = {w.condition: w for w in watch.update(record)}
    assert set(raised) == {"dino_uniform", "teacher_uniform"}
    dino = raised["dino_uniform"].message
    assert "\n" not in dino and "after 20 iterations" in dino
    for text in (f"dino_loss {1.01 * LN_K:.3f}", "uniform value 6.931", "= ln K", "dino.head_n_prototypes=1024",
                 # 4 samples x 2 global crops over 1024 prototypes: targets no sharper than ln(1024 / 8).
                 "Sinkhorn-Knopp", "ln(K / rows) = 4.85", "train.batch_size_per_gpu (now 4 x 1 process(es))",
                 "teacher.teacher_temp=0.07", "optim.base_lr=0.004", "optim.scaling_rule=none",
                 "optim.warmup_epochs=1 (10 iterations)", "train.collapse_watch.stop_run=true"):
        assert text in dino, text
    teacher = raised["teacher_uniform"].message
    assert f"teacher_entropy {0.97 * LN_K:.3f} against ln K = 6.931" in teacher and "teacher.momentum_teacher" in teacher
    assert raised["dino_uniform"].short == "dino@lnK" and watch.active_short == "teacher@lnK,dino@lnK"
    stop = watch.stop_message(list(raised.values()), 20)
    assert "train.collapse_watch.stop_run=false" in stop and "dino_uniform" in stop


def test_from_config_warmup_and_errors(tiny_cfg):
    # null: watch from the end of the LR warm-up (optim.warmup_epochs=1 of 10 iterations).
    assert CollapseWatch.from_config(tiny_cfg).settings.warmup_iterations == 10
    cfg = tiny_cfg.copy()
    cfg.train.collapse_watch.warmup_periods = 3
    cfg.train.log_period_iterations = 2
    assert CollapseWatch.from_config(cfg, world_size=2).settings.warmup_iterations == 6
    cfg.train.collapse_watch.patience_periods = 0
    with pytest.raises(ValueError, match=r"train\.collapse_watch\.patience_periods"):
        CollapseWatch.from_config(cfg)


def test_progress_line_and_bar_text():
    record = {"epoch": 0.3, "total_loss": 10.0, "dino_loss": 6.12, "dino_uniform_loss": LN_K, "ibot_loss": 3.0,
              "ibot_uniform_loss": IBOT_LINE, "koleo_loss": 0.5, "teacher_entropy": 5.2, "lr": 0.002,
              "iterations_per_s": 1.0, "collapse": ["dino_uniform"]}
    line = progress_line(record, 3, 10)
    for text in ("it 3/10", "epoch 0.30", "dino 6.120/6.931", "ibot 3.000/3.466", "teacher_entropy 5.20/6.93",
                 "lr 0.002", "1.00 it/s", "ETA 0:00:07", "collapse: dino_uniform"):
        assert text in line, (text, line)
    plain = {k: v for k, v in record.items() if "uniform" not in k and k not in ("teacher_entropy", "collapse")}
    assert "dino 6.120  ibot" in progress_line(plain, 3, 10)
    bar = ProgressBar(10, enabled=False)
    bar.update({"loss": 1.0, "collapse": "dino@lnK"})
    bar.close()


# ----------------------------------------------------------------------------- integration: real runs
# teacher_temp 1.0 makes the teacher flat from the first iteration, whatever the weights: its
# logits are cosines in [-1, 1] (unit prototypes, frozen weight_g), so the softmax entropy is at
# least ln K - (tanh(1) - ln cosh(1)) = ln K - 0.33 = 0.953 ln K for K = 1024 (measured: 0.999 ln K).
FLAT_TEACHER = ("teacher.teacher_temp=1.0", "teacher.warmup_teacher_temp=1.0")
# The CLS-rank check would fire too (a randomly initialised ViT gives all crops nearly the same
# CLS token); off here so that each run shows one known condition.
WATCH = ("train.collapse_watch.warmup_periods=1", "train.collapse_watch.patience_periods=2",
         "train.collapse_watch.min_cls_effective_rank=0", "train.log_period_iterations=1", "train.num_workers=0")


def test_forced_collapse_warns_in_log_and_metrics(tmp_path, tiny_argv):
    """Warm-up 1 period, patience 2: the flat teacher is reported after 3 iterations, once."""
    argv = tiny_argv(tmp_path, *FLAT_TEACHER, *WATCH, "train.max_iterations=5", "evaluation.eval_period_iterations=100",
                     "checkpointing.period_iterations=100")
    assert train3d.main(argv) == 0
    log = (tmp_path / "log.txt").read_text()
    assert log.count("WARNING dinov2.train.collapse: Collapse warning [teacher_uniform] after 3 iterations") == 1
    assert log.count("Collapse warning") == 1
    warning = next(line for line in log.splitlines() if "Collapse warning" in line)
    assert "against ln K = 6.931" in warning and "teacher.warmup_teacher_temp=1.0 -> teacher.teacher_temp=1.0" in warning
    assert [line["collapse"] for line in _metrics(tmp_path)] == [[], []] + [["teacher_uniform"]] * 3
    progress = {line.split(" it ")[1].split()[0]: line for line in log.splitlines() if "INFO dinov2.train: it " in line}
    assert "collapse:" not in progress["2/5"] and "collapse: teacher_uniform" in progress["3/5"]


def test_forced_collapse_with_stop_run_saves_and_exits_1(tmp_path, tiny_argv, capsys):
    argv = tiny_argv(tmp_path, *FLAT_TEACHER, *WATCH, "train.collapse_watch.stop_run=true", "train.max_iterations=6",
                     "checkpointing.period_iterations=2", "evaluation.eval_period_iterations=100")
    assert train3d.main(argv) == 1
    errors = [line for line in (tmp_path / "log.txt").read_text().splitlines() if " ERROR " in line]
    assert len(errors) == 1
    assert "Collapse [teacher_uniform] after 3 iterations" in errors[0]
    assert "train.collapse_watch.stop_run=false keeps going" in errors[0] and "model_0000003.pth" in errors[0]
    assert "Traceback" not in capsys.readouterr().err
    # That iteration is saved (teacher and full state) next to the earlier checkpoint; nothing after it ran.
    assert [it for it, _ in TrainingCheckpointer(tmp_path).list()] == [2, 3]
    assert (tmp_path / "eval" / "training_3" / "teacher_checkpoint.pth").is_file()
    assert [line["iteration"] for line in _metrics(tmp_path)] == [0, 1, 2]


def test_short_healthy_run_warns_nothing_and_logs_progress(tmp_path, tiny_argv):
    """The tiny recipe's first 6 iterations, watched from the first period with patience 2.

    What it shows: on a real run whose values are away from every threshold (DINO / iBOT losses
    still 5-12 % above their uniform values, teacher_entropy under 60 % of ln K, prototype
    entropy far from 0), the wiring raises nothing. What it does not show: that the tiny recipe
    stays healthy. It does not: left to run, its DINO loss reaches ln K within about 30
    iterations and the watch says so. The CLS-rank check is off here because a randomly
    initialised ViT gives every crop nearly the same CLS token (effective rank 1.0 from
    iteration 0), which that check rightly reports.
    """
    argv = tiny_argv(tmp_path, *WATCH, "train.collapse_watch.warmup_periods=0", "train.max_iterations=6",
                     "evaluation.eval_period_iterations=3", "checkpointing.period_iterations=100")
    assert train3d.main(argv) == 0
    log = (tmp_path / "log.txt").read_text()
    assert "Collapse" not in log and " WARNING " not in log
    assert all(line["collapse"] == [] for line in _metrics(tmp_path))
    # One progress line per period, losses against their uniform values, and each teacher export.
    progress = [line for line in log.splitlines() if "INFO dinov2.train: it " in line]
    assert [line.split("INFO dinov2.train: it ")[1].split()[0] for line in progress] == [f"{i}/6" for i in range(1, 7)]
    assert "dino " in progress[0] and "/6.931" in progress[0] and "teacher_entropy " in progress[0] and "ETA " in progress[0]
    for it in (3, 6):
        path = tmp_path / "eval" / f"training_{it}" / "teacher_checkpoint.pth"
        assert f"Teacher export after {it} iterations: {path}" in log


@pytest.mark.slow
@pytest.mark.torchrun
def test_stop_run_stops_every_rank_together(tmp_path, tiny_argv):
    """Two gloo processes: rank 0 decides, the decision is broadcast, both save and exit at iteration 3."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dinov2.train.train3d",
           *tiny_argv(tmp_path, *FLAT_TEACHER, *WATCH, "train.collapse_watch.stop_run=true", "train.batch_size_per_gpu=2",
                      "train.max_iterations=6", "checkpointing.period_iterations=2",
                      "evaluation.eval_period_iterations=100")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    # One ERROR line on stderr (rank 0 speaks for both) and in log.txt.
    assert result.stderr.count("ERROR: Collapse [teacher_uniform] after 3 iterations") == 1
    assert (tmp_path / "log.txt").read_text().count("ERROR dinov2.train: Collapse [teacher_uniform]") == 1
    assert [it for it, _ in TrainingCheckpointer(tmp_path).list()] == [2, 3]
    assert [line["iteration"] for line in _metrics(tmp_path)] == [0, 1, 2]


@pytest.mark.parametrize("layerscale, named", [(1e-05, True), (None, False)])
def test_near_identity_layerscale_is_named_as_a_cause(tiny_cfg, layerscale, named):
    """The small-scale finding: LayerScale 1e-5 makes the CLS token input-independent at the start."""
    watch = _watch(tiny_cfg, patience_periods=1)
    watch.facts["student.layerscale"] = layerscale
    raised = watch.update({"iteration": 0, **HEALTHY, **COLLAPSED["teacher_uniform"]})
    assert [w.condition for w in raised] == ["teacher_uniform"]
    assert ("student.layerscale=null" in raised[0].message) is named
