"""Finetuning loop: AdamW with warm-up + cosine, validation by sliding window, best checkpoint,
resumable state, and the final per-case test evaluation written to ``results.json``.

Files in ``output_dir``:

* ``config.yaml``: the resolved run configuration;
* ``best_model.pth``: self-describing best checkpoint (:mod:`dinov2.checkpoints.finetuned`), input of
  ``predict``;
* ``last_checkpoint.pth``: model, optimizer, scaler, iteration, curves and RNG states; a run
  started again with the same ``output_dir`` continues from it (``train.resume``);
* ``results.json``: training / validation curves, the best iteration, per-case per-class test
  Dice, IoU, HD95, NSD and voxel counts and their summaries (NaN written as ``null``);
* ``summary.json``: the same final evaluation in nnU-Net's layout (:func:`.metrics.build_summary`),
  on the labelled test cases, else on the validation cases;
* ``tensorboard/`` with ``train.tensorboard`` (``--tensorboard``): the training and validation
  scalars and a validation preview image (:mod:`.tracking`).

Every metric and its NaN rules (absent, missed and spurious classes) are defined in
:mod:`.metrics`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from monai.data import DataLoader
from monai.losses import DiceCELoss, DiceLoss
from monai.utils import set_determinism
from omegaconf import DictConfig
from tqdm import tqdm

from dinov2.checkpoints.finetuned import load_finetuned, save_finetuned
from dinov2.distributed import get_world_size, init_distributed
from dinov2.eval.presets import DatasetPreset
from dinov2.optim.param_groups import apply_optim_scheduler, get_param_groups
from dinov2.optim.schedules import CosineScheduler
from dinov2.plot import plot_at_end
from dinov2.train.metrics import format_eta
from dinov2.utils.config import config_to_dict, save_config
from dinov2.utils.cpus import cap_workers
from dinov2.utils.io import atomic_torch_save
from dinov2.utils.jsonsafe import json_safe
from dinov2.utils.precision import autocast_context, native_bf16_support, recommended_precision
from dinov2.utils.rng import capture_rng_state, restore_rng_state
from dinov2.utils.errors import UserError
from dinov2.utils.tensorboard import TensorBoard

from .data import eval_transforms, load_splits, make_dataset, spacing_of, train_transforms
from .ignore import IgnoreMaskedLoss, mask_ignored
from .inference import predict_probabilities
from .metrics import (SUMMARY_FILE, build_summary, case_metrics, discretize, label_to_masks, nsd_tolerances,
                      overlap_metrics, per_case_tables, summarize, write_summary)
from .model import build_backbone, build_segmentation_model, head_options, no_weights
from .tracking import PreviewCatcher, log_training, log_validation, open_tensorboard

logger = logging.getLogger(__name__)

class NonFiniteLossError(UserError, FloatingPointError):
    """The finetuning loss became NaN or infinite: the user lowers the learning rate or the precision."""


BEST_NAME, LAST_NAME, RESULTS_NAME = "best_model.pth", "last_checkpoint.pth", "results.json"
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(setting: str, device: torch.device) -> str:
    """``compute_precision.dtype``: ``auto`` = bf16 (or fp16 without bf16) on CUDA; on CPU bf16 only where it is native."""
    if setting not in PRECISION_CHOICES:
        raise ValueError(f"compute_precision.dtype must be one of {PRECISION_CHOICES}, got '{setting}'")
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if native_bf16_support(device) else "fp16"  # V100/T4 only emulate bf16: fp16 there
    return recommended_precision(device)


def build_train_loader(dataset: Any, batch_size: int, num_workers: int) -> DataLoader:
    """The shuffled training loader.

    Args:
        dataset: the cached training dataset.
        batch_size: ``train.batch_size``.
        num_workers: ``train.num_workers`` (``--num-workers``); capped at the CPUs available
            minus one (:func:`~dinov2.utils.cpus.cap_workers`).
    """
    workers = cap_workers(num_workers, "--num-workers/train.num_workers")
    # A last partial batch is dropped only when there is a full one to train on instead.
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                      drop_last=len(dataset) > batch_size, persistent_workers=workers > 0)


def build_loss(preset: DatasetPreset) -> torch.nn.Module:
    """DiceCE over softmax classes, or Dice over sigmoid region channels (without the ignored voxels
    when the preset has an ``ignore_label``, :mod:`.ignore`), with the preset's term weights
    (``loss_weights``) and Dice variant (``dice_variant``)."""
    weights, variant = preset.loss_weights, dice_options(preset.dice_variant)
    if preset.ignore_label is not None:
        return IgnoreMaskedLoss(preset.multilabel, weights["dice"], weights["ce"], **variant)
    if preset.loss == "dice_ce":
        return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=weights["dice"], lambda_ce=weights["ce"], **variant)
    return ScaledLoss(DiceLoss(sigmoid=True, **variant), weights["dice"])


def dice_options(variant: str) -> dict[str, bool]:
    """MONAI ``DiceLoss`` keyword arguments of a preset's ``dice_variant``."""
    return {"squared_pred": variant == "squared", "jaccard": variant == "jaccard"}


class ScaledLoss(torch.nn.Module):
    """``weight`` times ``loss`` (the Dice-only loss of region presets with their ``loss_weights.dice``)."""

    def __init__(self, loss: torch.nn.Module, weight: float):
        super().__init__()
        self.loss, self.weight = loss, float(weight)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.weight * self.loss(logits, label)


def supervised_loss(loss_fn: torch.nn.Module, logits: torch.Tensor | list[torch.Tensor],
                    label: torch.Tensor) -> torch.Tensor:
    """``loss_fn`` of the logits against ``label`` ``(B, 1 or K, *S)``.

    A list of logits (a head with deep supervision, training: ``(B, K, *S / 2**i)``, full
    resolution first) gives the mean weighted ``1, 1/2, 1/4, ...`` of the loss at each resolution,
    against the label resized by nearest neighbour (class indices and masks stay exact values).
    """
    if isinstance(logits, torch.Tensor):
        return loss_fn(logits.float(), label)
    weights = [0.5 ** i for i in range(len(logits))]
    losses = [loss_fn(out.float(), torch.nn.functional.interpolate(label.float(), size=out.shape[2:], mode="nearest")
                      .to(label.dtype)) for out in logits]
    return sum(w * loss for w, loss in zip(weights, losses)) / sum(weights)


def infinite_batches(loader: DataLoader, start_pass: int = 0) -> Iterator[dict]:
    """Endless stream of batches, reshuffled every pass over the training set."""
    n = start_pass
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(n)
        yield from loader
        n += 1


def evaluate(model, dataset, preset: DatasetPreset, cfg: DictConfig, device: torch.device, precision: str,
             with_hd: bool, tta_flip: bool = False, desc: str = "evaluation",
             on_case: Callable[[int, dict, torch.Tensor, torch.Tensor], None] | None = None) -> list[dict[str, Any]]:
    """Per-case metrics on whole preprocessed volumes (sliding window).

    Args:
        on_case: called per case with ``(index, item, pred, target)``, the ``(1, K, *S)`` masks
            the metrics compare (e.g. to draw a preview from a prediction made anyway).

    Returns:
        one dict per case: ``name``, ``reference_file``, ``spacing`` and the ``(K,)`` arrays of
        :func:`.metrics.overlap_metrics`, plus (``with_hd``) ``hd95`` and ``nsd``
        (:func:`.metrics.case_metrics`).
    """
    ev = cfg.evaluation
    tolerances = nsd_tolerances(cfg.dataset.nsd_tolerance_mm, preset.channel_names)
    cases = []
    # Whole volumes by sliding window take seconds to minutes each: show rate and ETA.
    for index in tqdm(range(len(dataset)), desc=desc, unit="case", leave=False, dynamic_ncols=True):
        item = dataset[index]
        # The whole volume, its blended logits and probabilities stay in host memory (a 512x512x300
        # CT with 14 classes is > 4 GB per float map); only the windows visit the device.
        image = item["image"].unsqueeze(0)
        probs = predict_probabilities(model, image, preset.roi_size, preset.multilabel, overlap=ev.overlap,
                                      blend=ev.blend, sw_batch_size=ev.sw_batch_size, tta_flip=tta_flip,
                                      autocast=autocast_context(precision, device), sw_device=device)
        pred = discretize(probs, preset.multilabel)
        label = torch.as_tensor(item["label"]).unsqueeze(0)
        target = label_to_masks(label.clamp(min=0), preset.out_channels, preset.multilabel)
        pred, target = mask_ignored(pred, target, label)  # ignore-label voxels (-1) count nowhere
        if on_case is not None:
            on_case(index, item, pred, target)
        spacing = spacing_of(item["image"])
        if with_hd:
            metrics = case_metrics(pred, target, spacing, tolerances, ev.hd_percentile)
        else:  # validation curve: voxel overlaps only (surface distances cost seconds per case)
            metrics = overlap_metrics(pred, target)
        reference = getattr(item["label"], "meta", {}).get("filename_or_obj")
        cases.append({"name": item.get("name", str(index)), "reference_file": reference and str(reference),
                      "spacing": list(spacing), **metrics})
    return cases


def resumable_weights(model: torch.nn.Module, pretrained_weights: str) -> dict[str, torch.Tensor]:
    """What a resumed run cannot rebuild: trainable parameters and buffers, not a frozen backbone.

    A frozen ViT-L is 1.2 GB that ``--pretrained-weights`` already holds; the resumable state of
    a frozen-backbone run is then the head alone. A frozen *random* backbone (``none``) is kept:
    nothing else can restore it. ``best_model.pth`` stays complete either way.
    """
    state = model.state_dict()
    if no_weights(pretrained_weights):
        return state
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v for k, v in state.items() if k not in frozen}


def load_resumable_weights(model: torch.nn.Module, resume: dict, pretrained_weights: str, path: Path) -> None:
    """Inverse of :func:`resumable_weights`: the frozen rest must come from the same pretrained file."""
    saved_from = resume.get("frozen_from", pretrained_weights)
    if saved_from != pretrained_weights:
        raise ValueError(f"{path} continues a run whose frozen backbone came from {saved_from}, but this run loads "
                         f"{pretrained_weights}. Pass the same --pretrained-weights, or a new --output-dir.")
    missing, unexpected = model.load_state_dict(resume["model"], strict=False)
    params = dict(model.named_parameters())
    trainable_missing = [k for k in missing if k not in params or params[k].requires_grad]
    if unexpected or trainable_missing:
        raise ValueError(f"{path} does not match this model (missing {trainable_missing[:5]}, unexpected "
                         f"{unexpected[:5]}): it was written with another head, backbone or "
                         "--train-feature-model setting. Use a new --output-dir, or the original settings.")


def prepare_run(cfg: DictConfig) -> tuple[torch.device, Path]:
    """Check that this is one process, create ``output_dir`` with its ``config.yaml`` and seed the run.

    Returns:
        ``(device, output_dir)``.

    Raises:
        ValueError: launched with torchrun (several processes).
    """
    if get_world_size() > 1:
        raise ValueError("Finetuning runs as one process (one GPU or the CPU); launch it with python -m "
                         "dinov2.eval.segmentation (or dinov2.eval.instances train), not torchrun.")
    ctx = init_distributed(str(cfg.device))
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir)
    set_determinism(seed=int(cfg.seed))
    return ctx.device, out_dir


def _build_model(cfg: DictConfig, preset: DatasetPreset, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The backbone (pretrained, or random with ``none``) under the configured head, on ``device``.

    Returns:
        ``(model, spec)``: the model maps ``(B, preset.in_channels, *roi_size)`` images to
        ``(B, preset.out_channels, *roi_size)`` logits; ``spec`` describes the backbone.
    """
    backbone, spec = build_backbone(cfg.pretrained_weights, cfg.model.arch, cfg.model.backbone_kwargs, preset.roi_size)
    model = build_segmentation_model(backbone, cfg.model.head, preset.in_channels, preset.out_channels,
                                     head_options(cfg.model, cfg.model.head), cfg.model.modality_merge,
                                     train_backbone=bool(cfg.model.train_backbone)).to(device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("Model: %s head on %s taps %s, %.2fM trainable parameters (backbone %s)", model.head_name,
                spec.get("arch") or "backbone", model.taps, n_train / 1e6,
                "finetuned" if cfg.model.train_backbone else "frozen")
    return model, spec


def _build_datasets(cfg: DictConfig, preset: DatasetPreset, splits: dict) -> tuple[Any, DataLoader]:
    """The validation dataset and the training loader (datasets cached under ``train.cache_dir`` when set).

    Returns:
        ``(val_ds, loader)``: whole preprocessed validation volumes; batches of ``train.batch_size``
        random crops of ``preset.roi_size``.
    """
    cache_dir = cfg.train.cache_dir
    train_ds = make_dataset(splits["training"], train_transforms(preset), cache_dir and Path(cache_dir) / "train",
                            cfg.train.cache_rate)
    val_ds = make_dataset(splits["validation"], eval_transforms(preset), cache_dir and Path(cache_dir) / "eval",
                          cfg.train.cache_rate)
    loader = build_train_loader(train_ds, int(cfg.train.batch_size), int(cfg.train.num_workers))
    return val_ds, loader


def build_optimizer(model: torch.nn.Module, oc: DictConfig) -> tuple[torch.optim.Optimizer, CosineScheduler, int]:
    """AdamW over layer-wise decayed parameter groups and its warm-up + cosine learning rate.

    Returns:
        ``(optimizer, lr_schedule, total_iters)``.

    Raises:
        ValueError: ``optim.epochs x optim.epoch_length`` is below 1.
    """
    total_iters = int(oc.epochs) * int(oc.epoch_length)
    if total_iters < 1:
        raise ValueError(f"optim.epochs x optim.epoch_length must be >= 1, got {oc.epochs} x {oc.epoch_length}")
    groups = get_param_groups(model, lr_decay_rate=float(oc.layerwise_decay), patch_embed_lr_mult=float(oc.patch_embed_lr_mult))
    optimizer = torch.optim.AdamW(groups, lr=float(oc.lr), weight_decay=float(oc.weight_decay))
    lr_schedule = CosineScheduler(float(oc.lr), float(oc.min_lr), total_iters, min(int(oc.warmup_iters), total_iters))
    return optimizer, lr_schedule, total_iters


def resume_or_start(cfg: DictConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler, last_path: Path, best_metric: str = "mean_dice") -> dict[str, Any]:
    """Load ``last_checkpoint.pth`` when ``train.resume`` is set and it exists (weights, optimizer, scaler, RNG).

    Returns:
        The loop state: ``iteration`` (completed), ``best`` (``iteration`` and ``best_metric``),
        ``train_curve``, ``val_curve``.
    """
    state = {"iteration": 0, "best": {"iteration": None, best_metric: -math.inf}, "train_curve": [], "val_curve": []}
    if cfg.train.resume and last_path.is_file():
        resume = torch.load(last_path, map_location="cpu", weights_only=False)
        load_resumable_weights(model, resume, str(cfg.pretrained_weights), last_path)
        optimizer.load_state_dict(resume["optimizer"])
        if resume["scaler"] and scaler.is_enabled():  # an fp32/bf16 run saved an empty scaler state
            scaler.load_state_dict(resume["scaler"])
        state = resume["state"]
        restore_rng_state(resume["rng"])
        logger.info("Resumed from %s at iteration %d", last_path, state["iteration"])
    return state


def _train_step(model: torch.nn.Module, batch: dict, loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, lr: float, it: int, oc: DictConfig, precision: str,
                device: torch.device) -> float:
    """One optimizer step at learning rate ``lr`` on ``batch``.

    Args:
        batch: ``image`` ``(B, C, *roi_size)`` and ``label`` ``(B, 1, *roi_size)`` class indices, or
            ``(B, K, *roi_size)`` region masks for a multilabel preset.

    Returns:
        The loss.

    Raises:
        NonFiniteLossError: the loss is not finite (before any update).
    """
    image, label = batch["image"].to(device), batch["label"].to(device)
    apply_optim_scheduler(optimizer, lr, float(oc.weight_decay), lr)
    with autocast_context(precision, device):
        logits = model(image)
    loss = supervised_loss(loss_fn, logits, label)
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"Loss is {loss.item()} at iteration {it}; lower --learning-rate or use --precision fp32.")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if oc.clip_grad:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(oc.clip_grad))
    scaler.step(optimizer)
    scaler.update()
    return loss.item()


def _log_training(state: dict[str, Any], running: list[float], t0: float, done: int, total_iters: int,
                  lr: float, tb: TensorBoard, crops_per_it: int) -> None:
    """Add the mean loss since the last log (``running``, begun at ``t0``) to the training curve, log it
    and write it to TensorBoard (with ``crops_per_it`` training crops per iteration for the throughput)."""
    mean_loss = float(np.mean(running))
    state["train_curve"].append({"iteration": done, "loss": mean_loss, "lr": lr})
    seconds_per_it = (time.perf_counter() - t0) / len(running)
    logger.info("it %d/%d loss %.4f lr %.2e (%.2f s/it, training ETA %s)", done, total_iters, mean_loss,
                lr, seconds_per_it, format_eta(seconds_per_it * (total_iters - done)))
    log_training(tb, done, mean_loss, lr, seconds_per_it, crops_per_it)


def _validate(model: torch.nn.Module, val_ds: Any, preset: DatasetPreset, cfg: DictConfig, device: torch.device,
              precision: str, state: dict[str, Any], done: int, best_path: Path, spec: dict,
              config_dict: dict, tb: TensorBoard) -> None:
    """Validation Dice after ``done`` iterations: add it to the curve and TensorBoard (with the preview of
    the first case); save ``best_model.pth`` when it is the best."""
    preview = PreviewCatcher(tb, preset)
    cases = evaluate(model, val_ds, preset, cfg, device, precision, with_hd=False, desc="validation", on_case=preview)
    summary = summarize(cases, preset.channel_names, preset.foreground_channels)
    log_validation(tb, done, summary)
    if preview.image is not None:
        tb.image("validation/preview", preview.image, done)
    tb.flush()
    state["val_curve"].append({"iteration": done, "mean_dice": summary["mean_dice"], "dice": summary["dice"]})
    logger.info("validation at %d: mean foreground Dice %.4f %s", done, summary["mean_dice"],
                {k: round(v, 4) for k, v in summary["dice"].items()})
    score = summary["mean_dice"] if not math.isnan(summary["mean_dice"]) else -math.inf
    if score > state["best"]["mean_dice"] or state["best"]["iteration"] is None:
        state["best"] = {"iteration": done, "mean_dice": score}
        save_finetuned(best_path, model, spec, config_dict, preset, done,
                       {"name": "validation mean foreground Dice", "value": score})


def _save_last_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                          state: dict[str, Any], cfg: DictConfig, last_path: Path) -> None:
    """Write the resumable state (:func:`resumable_weights`, optimizer, scaler, loop state, RNG)."""
    atomic_torch_save({"model": resumable_weights(model, cfg.pretrained_weights), "frozen_from": str(cfg.pretrained_weights),
                       "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "state": state,
                       "rng": capture_rng_state()}, last_path)


def _results(cfg: DictConfig, preset: DatasetPreset, model: torch.nn.Module, state: dict[str, Any],
             final: dict[str, Any] | None) -> dict[str, Any]:
    """The content of ``results.json``; ``final`` is :func:`evaluate_test_set`'s block (``test``, or
    ``validation_best`` when only the validation cases could be scored)."""
    split = final and final["split"]
    return {
        "dataset": preset.name, "head": model.head_name, "pretrained_weights": str(cfg.pretrained_weights),
        "train_backbone": bool(cfg.model.train_backbone), "dataset_percent": float(cfg.dataset.percent),
        "channels": preset.channel_names, "foreground_channels": preset.foreground_channels,
        "curves": {"train": state["train_curve"], "validation": state["val_curve"]},
        "best": state["best"], "test": final if split == "test" else None,
        **({"validation_best": final} if split == "validation" else {}),
        "summary_json": {"file": SUMMARY_FILE, "split": split} if final else None,
    }


def run_iterations(cfg: DictConfig, model: torch.nn.Module, loader: DataLoader, loss_fn: torch.nn.Module,
                   optimization: tuple[torch.optim.Optimizer, CosineScheduler, torch.amp.GradScaler, int],
                   state: dict[str, Any], precision: str, device: torch.device, out_dir: Path, crops_per_it: int,
                   validate: Callable[[int, TensorBoard], None]) -> None:
    """The training iterations from ``state["iteration"]`` on, shared with instance segmentation.

    One :func:`_train_step` per batch of ``loader`` (``image`` and ``label``, the target
    ``loss_fn`` compares the model's output with); the mean loss is logged with the training ETA
    every ``train.log_period_iterations``; every ``evaluation.eval_period_iterations`` and at the
    end, ``validate(done, tb)`` (which keeps the best checkpoint) runs, then ``last_checkpoint.pth``
    is written.

    Args:
        optimization: ``(optimizer, lr_schedule, scaler, total_iters)``.
        crops_per_it: training crops per iteration (TensorBoard's throughput).
    """
    optimizer, lr_schedule, scaler, total_iters = optimization
    eval_every = max(int(cfg.evaluation.eval_period_iterations), 1)
    log_every = max(int(cfg.train.log_period_iterations), 1)
    batches = infinite_batches(loader, start_pass=state["iteration"])
    running, t0 = [], time.perf_counter()
    model.train()
    with open_tensorboard(cfg, out_dir, state["iteration"]) as tb:
        for it in range(state["iteration"], total_iters):
            batch = next(batches)
            lr = lr_schedule[it]
            running.append(_train_step(model, batch, loss_fn, optimizer, scaler, lr, it, cfg.optim, precision, device))
            done = it + 1
            if done % log_every == 0 or done == total_iters:
                _log_training(state, running, t0, done, total_iters, lr, tb, crops_per_it)
                running, t0 = [], time.perf_counter()
            if done % eval_every == 0 or done == total_iters:
                validate(done, tb)
                state["iteration"] = done
                _save_last_checkpoint(model, optimizer, scaler, state, cfg, out_dir / LAST_NAME)
                model.train()


def run_finetuning(cfg: DictConfig) -> dict[str, Any]:
    """Train a segmentation head (and optionally the backbone), select on validation, test.

    Args:
        cfg: resolved config (``dinov2/configs/eval/segmentation_default.yaml`` + preset + user).

    Returns:
        The content written to ``results.json``.
    """
    device, out_dir = prepare_run(cfg)
    preset = DatasetPreset.from_config(cfg.dataset)
    nsd_tolerances(cfg.dataset.nsd_tolerance_mm, preset.channel_names)  # a wrong list fails now, not after training
    splits = load_splits(preset, cfg.dataset.base_data_dir, float(cfg.dataset.percent), int(cfg.dataset.seed),
                         skip_bad=bool(cfg.dataset.skip_bad_inputs), report_dir=out_dir,
                         read_voxels=bool(cfg.dataset.preflight))
    logger.info("Dataset %s: %d training, %d validation, %d test cases", preset.name,
                *(len(splits[s]) for s in ("training", "validation", "test")))
    model, spec = _build_model(cfg, preset, device)
    val_ds, loader = _build_datasets(cfg, preset, splits)
    oc = cfg.optim
    optimizer, lr_schedule, total_iters = build_optimizer(model, oc)
    precision = resolve_precision(str(cfg.compute_precision.dtype), device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_fn = build_loss(preset)
    logger.info("Training %d iterations on %s in %s", total_iters, device, precision)
    last_path, best_path = out_dir / LAST_NAME, out_dir / BEST_NAME
    state = resume_or_start(cfg, model, optimizer, scaler, last_path)
    config_dict = config_to_dict(cfg)
    crops_per_it = int(cfg.train.batch_size) * int(cfg.dataset.sampling.num_samples)

    def validate(done: int, tb: TensorBoard) -> None:
        _validate(model, val_ds, preset, cfg, device, precision, state, done, best_path, spec, config_dict, tb)

    run_iterations(cfg, model, loader, loss_fn, (optimizer, lr_schedule, scaler, total_iters), state, precision,
                   device, out_dir, crops_per_it, validate)
    final, summary = evaluate_test_set(best_path, splits, preset, cfg, device, precision)
    results = _results(cfg, preset, model, state, final)
    (out_dir / RESULTS_NAME).write_text(json.dumps(json_safe(results), indent=2) + "\n")
    logger.info("Wrote %s", out_dir / RESULTS_NAME)
    if summary is not None:
        logger.info("Wrote %s", write_summary(out_dir / SUMMARY_FILE, summary))
    plot_at_end(out_dir)
    return results


def _final_split(splits: dict) -> tuple[str, list[dict]]:
    """``("test", its labelled entries)``, else ``("validation", ...)``; warns about what that means."""
    split = "test" if any("label" in e for e in splits["test"]) else "validation"
    labelled = [e for e in splits[split] if "label" in e]
    if not labelled:
        logger.warning("No labelled test or validation cases: results.json has no final metrics, no summary.json.")
    elif split == "validation":  # still worth writing, but it is the split that chose the checkpoint
        logger.warning("No labelled test cases: the final metrics (results.json validation_best, summary.json) "
                       "are on the validation cases, which also chose the best checkpoint (optimistic).")
    return split, labelled


def evaluate_test_set(best_path: Path, splits: dict, preset: DatasetPreset, cfg: DictConfig, device: torch.device,
                      precision: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Every metric of :mod:`.metrics` for the best checkpoint on the labelled test cases, else the validation ones.

    Returns:
        ``(block, summary)``: ``results.json``'s ``{"split", "iteration", "cases", "summary"}`` and
        the content of ``summary.json`` (:func:`.metrics.build_summary`); ``(None, None)`` when no
        case has a label.
    """
    split, labelled = _final_split(splits)
    if not labelled:
        return None, None
    model, _, info = load_finetuned(best_path, device)
    dataset = make_dataset(labelled, eval_transforms(preset), None, cfg.train.cache_rate)
    cases = evaluate(model, dataset, preset, cfg, device, precision, with_hd=True,
                     tta_flip=bool(cfg.evaluation.tta_flip), desc=split)
    names, foreground = preset.channel_names, preset.foreground_channels
    summary = summarize(cases, names, foreground)
    missed = sum(summary["missed"][names[k]] for k in foreground)
    logger.info("%s (best iteration %d): mean foreground Dice %.4f, NSD %.4f, HD95 %.2f mm; %d missed case-class "
                "pair(s) (Dice 0, no HD95)", split, info["iteration"], summary["mean_dice"], summary["mean_nsd"],
                summary["mean_hd95"], missed)
    block = {"split": split, "iteration": info["iteration"], "cases": per_case_tables(cases, names), "summary": summary}
    tolerances = dict(zip(names, nsd_tolerances(cfg.dataset.nsd_tolerance_mm, names)))
    return block, build_summary(cases, names, foreground, split=split, iteration=info["iteration"],
                                foreground_classes=[names[k] for k in foreground],
                                hd_percentile=float(cfg.evaluation.hd_percentile), nsd_tolerance_mm=tolerances)
