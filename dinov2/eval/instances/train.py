"""Train the distance model of 3D instance segmentation (``python -m dinov2.eval.instances train``).

Recipe (CPU)::

    python -m dinov2.sample_data.instances --out data/nuclei
    python -m dinov2.eval.instances train --datalist data/nuclei/fold0.json --output-dir runs/nuclei \\
        --pretrained-weights none
    python -m dinov2.eval.instances segment data/nuclei/nuclei_q0.tif --checkpoint runs/nuclei/best_model.pth \\
        --output seg

The loop is segmentation finetuning's (:func:`dinov2.eval.segmentation.train_loop.run_iterations`:
AdamW with warm-up + cosine, layer-wise LR decay of a finetuned backbone, loss logged with the
training ETA, resume from ``last_checkpoint.pth``, optional TensorBoard); what differs is the
target (:func:`.targets.distance_target`), the loss (:class:`DistanceLoss`) and the validation:
sliding-window distance maps of the validation stacks, the watershed thresholds searched on them
(:func:`.thresholds.search_thresholds`), the best model chosen by mean OP_CSB and saved with its
thresholds. Merge order of the config: packaged ``eval/instances_default.yaml`` (over the ``model``
section of ``eval/segmentation_default.yaml``) ← ``--config-file`` ← flags ← ``key=value``.

Files in ``--output-dir``: ``config.yaml``; ``best_model.pth`` (weights, preprocessing, spacing
settings and thresholds: all ``segment`` needs, :mod:`.model`); ``last_checkpoint.pth``;
``metrics.jsonl`` (one line per validation: ``iteration``, ``op_csb``, ``seg``, ``det``, ``f1``,
``cells_max``, ``cell_fill``); ``results.json`` (training and validation curves, the best
validation, and the scores of every labelled test stack with the stored thresholds);
``tensorboard/`` with ``--tensorboard``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from dinov2.eval.segmentation.finetune import TRAINING_FLAG_KEYS, add_training_arguments, check_required
from dinov2.eval.segmentation.model import HEAD_NAMES, canonical_head_name
from dinov2.eval.segmentation.train_loop import (BEST_NAME, LAST_NAME, build_optimizer, prepare_run,
                                                 resume_or_start, build_train_loader, resolve_precision,
                                                 run_iterations)
from dinov2.utils.config import ConfigError, config_to_dict, load_config
from dinov2.utils.entry_point import entry_point, start_entry_point
from dinov2.utils.jsonsafe import json_safe
from dinov2.utils.precision import autocast_context
from dinov2.utils.tensorboard import TensorBoard

from .data import Case, Preprocessing, load_cases, training_dataset
from .metrics import instance_scores
from .model import build_distance_model, load_distance_model, packaged_defaults, save_distance_model, stack_distance
from .postprocess import instances_from_distance
from .thresholds import TABLE_COLUMNS, search_thresholds

logger = logging.getLogger("dinov2.eval.instances")

METRICS_NAME, RESULTS_NAME = "metrics.jsonl", "results.json"
BEST_METRIC = "op_csb"
FLAG_KEYS = {**TRAINING_FLAG_KEYS, "datalist": "dataset.datalist", "head": "model.head",
             "image_size": "dataset.image_size", "scale": "dataset.scale"}
REQUIRED = {"dataset.datalist": "--datalist", "output_dir": "--output-dir",
            "pretrained_weights": "--pretrained-weights"}


class DistanceLoss(torch.nn.Module):
    """``mse_weight`` x MSE + ``bce_weight`` x binary cross-entropy of a predicted distance map.

    The cross-entropy takes the target map itself as a soft label: its minimum is the same map as
    the MSE's (a hard foreground label would pull every object voxel to 1 and erase the valleys
    between touching objects), with steeper gradients where the prediction saturates near 0 or 1.
    """

    def __init__(self, mse_weight: float = 1.0, bce_weight: float = 0.0):
        super().__init__()
        if min(mse_weight, bce_weight) < 0 or mse_weight + bce_weight <= 0:
            raise ConfigError(f"loss.mse_weight ({mse_weight}) and loss.bce_weight ({bce_weight}) must be >= 0, "
                              "not both 0")
        self.mse_weight, self.bce_weight = float(mse_weight), float(bce_weight)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``pred`` ``(B, 1, *S)`` in [0, 1] against the target ``(B, 1, *S)`` in [0, 1]."""
        target = target.to(pred.dtype)
        loss = self.mse_weight * F.mse_loss(pred, target)
        if self.bce_weight:
            eps = 1e-6  # the sigmoid reaches exactly 0 or 1 in float32: keep the logarithms finite
            loss = loss + self.bce_weight * F.binary_cross_entropy(pred.clamp(eps, 1 - eps), target)
        return loss


def get_args_parser() -> argparse.ArgumentParser:
    """The ``train`` command line: segmentation finetuning's flags, plus ``--datalist`` and ``--scale``."""
    p = argparse.ArgumentParser(prog="python -m dinov2.eval.instances train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=None, help="YAML merged over the defaults")
    p.add_argument("--datalist", help="finetuning datalist JSON of image and instance-label stacks (dataset.datalist)")
    p.add_argument("--output-dir", help="where config, checkpoints, metrics.jsonl and results.json go")
    p.add_argument("--pretrained-weights", help="teacher checkpoint, or 'none' (random init of model.arch)")
    p.add_argument("--head", choices=HEAD_NAMES, type=canonical_head_name, help="model.head")
    p.add_argument("--image-size", type=int, nargs="+", metavar="SIZE",
                   help="training crop = sliding window, 1 or 3 ints, multiples of the patch (dataset.image_size)")
    p.add_argument("--scale", type=float, help="zoom factor per axis before the model (dataset.scale)")
    add_training_arguments(p, "the training and validation scalars")
    return p


def build_config(args: argparse.Namespace) -> DictConfig:
    """Merge the defaults ← config file ← flags ← ``key=value`` and check the required keys.

    Raises:
        ConfigError: an unknown key, or a required value not given.
    """
    flags = {key: getattr(args, dest, None) for dest, key in FLAG_KEYS.items()}
    if flags["dataset.image_size"] is not None and len(flags["dataset.image_size"]) == 1:
        flags["dataset.image_size"] = flags["dataset.image_size"] * 3
    cfg = load_config(packaged_defaults(), args.config_file, flags, args.opts, open_keys=("model.backbone_kwargs",))
    check_required(cfg, REQUIRED)
    return cfg


def _scores_row(row: dict) -> dict:
    """The means of a threshold-search row (:data:`.thresholds.TABLE_COLUMNS`) as plain floats."""
    return {key: float(row[key]) for key in TABLE_COLUMNS}


def predict_cases(model: torch.nn.Module, cases: Sequence[Case], prep: Preprocessing, cfg: DictConfig,
                  device: torch.device, precision: str, desc: str) -> list[np.ndarray]:
    """Distance maps ``(X, Y, Z)`` of the cases' stacks on their own grids (a progress bar with ETA)."""
    ev = cfg.evaluation
    return [stack_distance(model, case.image, prep, float(ev.overlap), int(ev.sw_batch_size),
                           autocast_context(precision, device), device)
            for case in tqdm(cases, desc=desc, unit="stack", leave=False, dynamic_ncols=True)]


def _validate(model, cases: Sequence[Case], prep: Preprocessing, cfg: DictConfig, device: torch.device,
              precision: str, state: dict[str, Any], done: int, tb: TensorBoard, out_dir: Path,
              save_best) -> None:
    """Search the thresholds on the validation stacks' distance maps; log, record, keep the best model."""
    distances = predict_cases(model, cases, prep, cfg, device, precision, "validation")
    pp = cfg.postprocess
    search = search_thresholds([(d, c.labels.array) for d, c in zip(distances, cases)], pp.cells_max, pp.cell_fill,
                               min_voxels=int(pp.min_voxels))
    best_row = next(r for r in search.table if (r["cells_max"], r["cell_fill"]) == (search.cells_max, search.cell_fill))
    record = {"iteration": done, **_scores_row(best_row)}
    state["val_curve"].append(record)
    (out_dir / METRICS_NAME).write_text("".join(json.dumps(json_safe(r)) + "\n" for r in state["val_curve"]))
    tb.scalars({k: record[k] for k in ("op_csb", "seg", "det", "f1")}, done, group="validation")
    tb.flush()
    logger.info("validation at %d: OP_CSB %.4f (SEG %.4f, DET %.4f, F1 %.4f) at cells_max %.2f, cell_fill %.2f", done,
                record["op_csb"], record["seg"], record["det"], record["f1"], search.cells_max, search.cell_fill)
    score = record["op_csb"] if not math.isnan(record["op_csb"]) else -math.inf
    if score > state["best"][BEST_METRIC] or state["best"]["iteration"] is None:
        state["best"] = {"iteration": done, BEST_METRIC: score, "cells_max": search.cells_max,
                         "cell_fill": search.cell_fill}
        save_best(done, {"cells_max": search.cells_max, "cell_fill": search.cell_fill},
                  {"name": "validation mean OP_CSB", "value": score})


def _nan_mean(values: Sequence[float]) -> float:
    """Mean over the defined values (a stack without objects has NaN scores); NaN when none is."""
    values = np.asarray(values, dtype=np.float64)
    return float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else float("nan")


def evaluate_test(best_path: Path, cases: Sequence[Case], prep: Preprocessing, cfg: DictConfig, device: torch.device,
                  precision: str) -> dict[str, Any] | None:
    """Scores of the best model with its stored thresholds on the labelled test stacks (None without any)."""
    labelled = [c for c in cases if c.labels is not None]
    if not labelled:
        logger.warning("No labelled test stacks: results.json has no test scores.")
        return None
    model, info = load_distance_model(best_path, device)
    thresholds = info["thresholds"]
    distances = predict_cases(model, labelled, prep, cfg, device, precision, "test")
    rows = []
    for case, dist in zip(labelled, distances):
        labels = instances_from_distance(dist, thresholds["cells_max"], thresholds["cell_fill"],
                                         min_voxels=int(cfg.postprocess.min_voxels))
        rows.append({"name": case.name, **instance_scores(case.labels.array, labels).as_dict()})
    mean = {k: _nan_mean([r[k] for r in rows]) for k in ("op_csb", "seg", "det", "f1", "precision", "recall")}
    logger.info("test (best iteration %d, thresholds %s): OP_CSB %.4f, SEG %.4f, DET %.4f", info["iteration"],
                thresholds, mean["op_csb"], mean["seg"], mean["det"])
    return {"iteration": info["iteration"], "thresholds": thresholds, "cases": rows, "mean": mean}


def run_training(cfg: DictConfig) -> dict[str, Any]:
    """Train, choose the best model and its thresholds on validation, score it on the test stacks.

    Args:
        cfg: the resolved config (:func:`build_config`).

    Returns:
        The content written to ``results.json``.
    """
    device, out_dir = prepare_run(cfg)
    prep = Preprocessing.from_config(cfg.dataset)
    cases = load_cases(cfg.dataset.datalist)
    logger.info("Datalist %s: %d training, %d validation, %d test stacks", cfg.dataset.datalist,
                *(len(cases[s]) for s in ("training", "validation", "test")))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model, spec = build_distance_model(str(cfg.pretrained_weights), model_cfg, prep.roi_size)
    model = model.to(device)
    dataset = training_dataset(cases["training"], prep, int(cfg.dataset.crops_per_stack), cfg.dataset.augment)
    loader = build_train_loader(dataset, int(cfg.train.batch_size), int(cfg.train.num_workers))
    optimizer, lr_schedule, total_iters = build_optimizer(model, cfg.optim)
    precision = resolve_precision(str(cfg.compute_precision.dtype), device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_fn = DistanceLoss(float(cfg.loss.mse_weight), float(cfg.loss.bce_weight))
    logger.info("Training %s head (%s backbone) for %d iterations on %s in %s", model.head_name,
                "finetuned" if cfg.model.train_backbone else "frozen", total_iters, device, precision)
    state = resume_or_start(cfg, model, optimizer, scaler, out_dir / LAST_NAME, best_metric=BEST_METRIC)
    config_dict, best_path = config_to_dict(cfg), out_dir / BEST_NAME

    def save_best(done: int, thresholds: dict, metric: dict) -> None:
        save_distance_model(best_path, model, spec, config_dict, thresholds, done, metric)

    def validate(done: int, tb: TensorBoard) -> None:
        _validate(model, cases["validation"], prep, cfg, device, precision, state, done, tb, out_dir, save_best)

    crops_per_it = int(cfg.train.batch_size) * int(cfg.dataset.crops_per_stack)
    run_iterations(cfg, model, loader, loss_fn, (optimizer, lr_schedule, scaler, total_iters), state, precision,
                   device, out_dir, crops_per_it, validate)
    results = {"head": model.head_name, "pretrained_weights": str(cfg.pretrained_weights),
               "train_backbone": bool(cfg.model.train_backbone), "datalist": str(cfg.dataset.datalist),
               "curves": {"train": state["train_curve"], "validation": state["val_curve"]}, "best": state["best"],
               "test": evaluate_test(best_path, cases["test"], prep, cfg, device, precision)}
    (out_dir / RESULTS_NAME).write_text(json.dumps(json_safe(results), indent=2) + "\n")
    logger.info("Wrote %s", out_dir / RESULTS_NAME)
    return results


@entry_point(user_errors=(ValueError,))
def main(argv: Sequence[str] | None = None) -> int:
    """Run ``train``; returns the exit code (1 with one ``ERROR:`` line for a user error)."""
    args = get_args_parser().parse_intermixed_args(argv)
    start_entry_point()
    from dinov2.utils.errors import explained_resource_errors

    cfg = build_config(args)
    memory_advice = ("Lower --batch-size, dataset.crops_per_stack, --image-size or evaluation.sw_batch_size; "
                     "without --train-feature-model the backbone needs no gradients.")
    disk_advice = f"Free space under {cfg.output_dir}, or use a larger disk."
    with explained_resource_errors(memory_advice, disk_advice):
        results = run_training(cfg)
    best = results["best"]
    print(f"best validation OP_CSB {best[BEST_METRIC]:.4f} at iteration {best['iteration']} (cells_max "
          f"{best['cells_max']}, cell_fill {best['cell_fill']}); model in {Path(cfg.output_dir) / BEST_NAME}")
    if results["test"]:
        print(f"test mean OP_CSB {results['test']['mean']['op_csb']:.4f} (SEG {results['test']['mean']['seg']:.4f}, "
              f"DET {results['test']['mean']['det']:.4f}); see {Path(cfg.output_dir) / RESULTS_NAME}")
    return 0
