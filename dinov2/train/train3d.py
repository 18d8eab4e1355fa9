"""Pretraining entry point: DINO + iBOT + KoLeo on 3D volumes.

Launch (details in docs/launching.md)::

    # one process (CPU, or one GPU); configs/small_cpu.yaml is a recipe that learns on a CPU
    python -m dinov2.train.train3d --config-file configs/small_cpu.yaml --output-dir out \\
        train.datalist=pretrain.json
    # torchrun, one node: one process per GPU (gloo on CPU, NCCL on GPUs)
    torchrun --standalone --nproc_per_node 2 -m dinov2.train.train3d \\
        --config-file configs/tiny_cpu.yaml --output-dir out train.datalist=pretrain.json
    # torchrun, several nodes: the same command on every node, R = 0 on HOST, 1 on the next, ...
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port PORT --nproc_per_node G \\
        -m dinov2.train.train3d --config-file my_run.yaml --output-dir /shared/runs/my_run \\
        train.datalist=/shared/pretrain.json
    # SLURM through submitit (requeued on timeout or preemption; --dry-run prints the sbatch script)
    python -m dinov2.run.submit train3d --nodes 2 --gpus-per-node 8 --partition gpu --timeout 2880 \\
        --cpus-per-task 10 --output-dir /shared/runs/my_run \\
        -- --config-file my_run.yaml train.datalist=/shared/pretrain.json

Config, merged in this order (later wins): packaged ``data_defaults.yaml`` <-
``ssl3d_default_config.yaml`` <- ``--config-file`` (a path, or a packaged name such as
``train/vit3d_highres``) <- the flags (``--cache-dir``, ``--device``) <- ``key=value`` overrides.
A key the packaged defaults do not define is an error (docs/configuration.md lists them all).
The resolved config goes to ``<output-dir>/config.yaml``. ``train.num_workers`` is lowered to the CPUs available to the
process minus one when it asks for more.

Outputs in ``--output-dir``: ``training_metrics.json`` (one JSON line per logging step),
``checkpoints/model_<iter>.pth`` (full training state, the last K), ``eval/training_<iter>/
teacher_checkpoint.pth`` (teacher exports, ``<iter>`` = completed iterations), ``log.txt`` (one
progress line per logging period, every export and checkpoint, collapse warnings); with
``--tensorboard`` (``train.tensorboard``), ``tensorboard/`` (every metric as a scalar, and the teacher's
PCA and attention images of the datalist's first volume at each export: :mod:`dinov2.train.previews`).
A run restarted with the same output folder resumes from its latest checkpoint (unless
``--no-resume``) and ends with the same weights as a run that was never interrupted.

Collapse (``train.collapse_watch``, :mod:`dinov2.train.collapse`): a warning names what was seen
and what to change; with ``stop_run`` the run saves that iteration and exits with code 1.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinov2 import distributed
from dinov2.checkpoints.layouts import read_checkpoint
from dinov2.checkpoints.teacher_export import save_teacher_checkpoint
from dinov2.checkpoints.training_state import TrainingCheckpointer
from dinov2.data.collate import make_collate_fn
from dinov2.data.datasets import build_pretrain_dataset
from dinov2.data.loader import batch_to_device, build_train_loader, seed_training_step
from dinov2.data.preflight import PreflightCache, checked_pretrain_entries
from dinov2.data.samplers import InfiniteSampler
from dinov2.optim.param_groups import apply_optim_scheduler
from dinov2.optim.schedules import build_schedulers
from dinov2.train.collapse import CollapseError, CollapseWatch
from dinov2.train.metrics import MetricsLogger, ProgressBar, ThroughputMeter, progress_line
from dinov2.train.previews import TeacherPreviews
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.config import ConfigError, config_to_dict, load_config, load_yaml, packaged_config_path, save_config
from dinov2.utils.device import add_device_argument, resolve_device
from dinov2.utils.entry_point import add_debug_flag, entry_point, log_formatter, start_entry_point, user_input
from dinov2.utils.errors import UsageError, UserError, explained_resource_errors
from dinov2.utils.rng import capture_rng_state, restore_rng_state

logger = logging.getLogger("dinov2.train")

LOSS_KEYS = ("total_loss", "dino_loss", "ibot_loss", "koleo_loss")


# flag dest -> config key (besides --config-file, --output-dir, --no-resume and key=value overrides)
FLAG_KEYS = {"cache_dir": "preprocessing.cache.dir", "device": "device", "skip_bad_inputs": "train.skip_bad_inputs",
             "tensorboard": "train.tensorboard"}


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or infinite; the message names the iteration and the last checkpoint."""


# --------------------------------------------------------------------------------- config
def default_config() -> DictConfig:
    """The packaged defaults: data sections (``data_defaults.yaml``) merged under the training recipe.

    Raises:
        ValueError: if both files define the same top-level section (each key has one home).
    """
    data = load_yaml(packaged_config_path("data_defaults"))
    recipe = load_yaml(packaged_config_path("ssl3d_default_config"))
    clash = sorted(set(data) & set(recipe))
    if clash:
        raise ValueError(f"Sections {clash} are defined in both data_defaults.yaml and ssl3d_default_config.yaml; "
                         "keep each in one file.")
    return OmegaConf.merge(data, recipe)


def build_config(config_file: str | None = None, overrides: Sequence[str] = (), cache_dir: str | None = None,
                 device: str | None = None, skip_bad_inputs: bool | None = None,
                 tensorboard: bool | None = None) -> DictConfig:
    """Resolved training config: defaults <- ``config_file`` <- flags <- ``overrides``.

    Args:
        config_file: a YAML path or a packaged name (``train/vit3d_highres``).
        overrides: ``key=value`` strings.
        cache_dir: sets ``preprocessing.cache.dir`` (the ``--cache-dir`` flag).
        device: sets ``device`` (the ``--device`` flag).
        skip_bad_inputs: True sets ``train.skip_bad_inputs`` (the ``--skip-bad-inputs`` flag).
        tensorboard: True sets ``train.tensorboard`` (the ``--tensorboard`` flag).

    Raises:
        ConfigError: keys the defaults do not know (typos; the message names the key, the file or
            command line, and the closest known key) or required values left as ``???`` (in the
            defaults, or in ``config_file`` and not set later).
    """
    flags = {FLAG_KEYS["cache_dir"]: cache_dir, FLAG_KEYS["device"]: device,
             FLAG_KEYS["skip_bad_inputs"]: True if skip_bad_inputs else None,
             FLAG_KEYS["tensorboard"]: True if tensorboard else None}
    cfg = load_config(default_config(), config_file, flags, overrides)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"Config values {missing} are required (??? in the defaults or --config-file); pass them "
                          f"as key=value, e.g. {missing[0]}=...")
    return cfg


# --------------------------------------------------------------------------------- run
def _setup_logging(output_dir: Path, is_main: bool) -> tuple[list[logging.Handler], tuple[int, bool]]:
    """Log ``dinov2.*`` to stderr (rank 0: INFO, others: WARNING) and to ``log.txt`` on rank 0.

    Records do not also propagate to the root logger meanwhile: a program that configured root
    logging (the demo, a notebook) would otherwise print every line twice.

    Returns:
        The handlers added and the logger's previous ``(level, propagate)``, for :func:`_teardown_logging`.
    """
    root = logging.getLogger("dinov2")
    previous = (root.level, root.propagate)
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    root.propagate = False
    fmt = log_formatter()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if is_main:
        handlers.append(logging.FileHandler(output_dir / "log.txt"))
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    return handlers, previous


def _log_to_file(handlers: list[logging.Handler], exc: BaseException) -> None:
    """Record ``exc`` as an ERROR line in ``log.txt`` only (stderr gets the entry point's ``ERROR:`` line)."""
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "%s", (exc,), None)
    for handler in handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _teardown_logging(handlers: list[logging.Handler], previous: tuple[int, bool]) -> None:
    root = logging.getLogger("dinov2")
    root.setLevel(previous[0])
    root.propagate = previous[1]
    for handler in handlers:
        root.removeHandler(handler)
        handler.close()


def _iteration_plan(cfg: DictConfig) -> tuple[int, int]:
    per_epoch = int(cfg.train.iterations_per_epoch)
    total = int(cfg.optim.epochs) * per_epoch
    if cfg.train.max_iterations is not None:
        total = min(total, int(cfg.train.max_iterations))
    if total < 1:
        raise UsageError(f"Nothing to train: optim.epochs * train.iterations_per_epoch (or train.max_iterations) = {total}.")
    return per_epoch, total


def _load_pretrained(arch: SSLMetaArch, path: str) -> None:
    contents = read_checkpoint(path, hint="Check student.pretrained_weights: a teacher_checkpoint.pth of an earlier run.")
    state = {f"backbone.{k}": v for k, v in contents.backbone.items()}
    for head in ("dino_head", "ibot_head"):
        if head not in contents.heads:
            raise UsageError(f"{path} has no {head}; student.pretrained_weights must be a teacher export with both heads.")
        state.update({f"{head}.{k}": v for k, v in contents.heads[head].items()})
    try:
        arch.load_pretrained_teacher(state)
    except ValueError as exc:  # another architecture or heads: name the file the user gave
        raise UsageError(f"student.pretrained_weights={path}: {exc}") from exc
    logger.info("Student and teacher start from %s (%s)", path, contents.source_format)


def _training_state(arch: SSLMetaArch, optimizer, scaler, iteration: int, stream_position: int, sampler_seed: int,
                    dataset_size: int, cfg: DictConfig) -> dict[str, Any]:
    """Everything a resumed run needs (collective: every rank must call it).

    ``stream_position`` counts the samples all ranks consumed so far (the global batch may have
    changed at an earlier resume, so it is tracked rather than derived from ``iteration``).
    """
    sampler = InfiniteSampler(dataset_size, shuffle=True, seed=sampler_seed, rank=0, world_size=1)
    sampler.set_global_position(stream_position)
    return {
        "iteration": iteration,
        "model": arch.full_state_dict(),
        "optimizer": arch.optimizer_state_dict(optimizer),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "sampler": sampler.state_dict(),
        "rng": distributed.all_gather_object(capture_rng_state()),
        "world_size": distributed.get_world_size(),
        "config": config_to_dict(cfg),
    }


def _start_or_resume(arch: SSLMetaArch, scaler, cfg: DictConfig, latest: Path | None,
                     global_batch: int) -> tuple[torch.optim.Optimizer, int, int]:
    """Load the latest training state (or the pretrained teacher), wrap for DDP/FSDP, build the optimizer.

    Returns:
        ``(optimizer, start_iteration, start_stream_position)``.
    """
    state = None
    if latest is not None:
        state = TrainingCheckpointer.load(latest)
        arch.load_full_state_dict(state["model"])
    elif cfg.student.pretrained_weights:
        _load_pretrained(arch, str(cfg.student.pretrained_weights))
    # Wrap (DDP) or shard (FSDP) only after loading plain weights, and build the optimizer on
    # the parameters that result.
    arch.prepare_distributed(str(cfg.compute_precision.strategy))
    optimizer = arch.build_optimizer()
    if state is None:
        return optimizer, 0, 0
    arch.load_optimizer_state_dict(optimizer, state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    start_iter = int(state["iteration"])
    start_position = int(state["sampler"]["global_position"])
    if start_position != InfiniteSampler.position_for(start_iter, global_batch):
        logger.warning("The global batch changed since the checkpoint (%d samples consumed in %d iterations); "
                       "the data stream continues where it stopped", start_position, start_iter)
    world = distributed.get_world_size()
    if int(state["world_size"]) == world:
        restore_rng_state(state["rng"][distributed.get_rank()])
    logger.info("Resumed from %s: iteration %d, stream position %d (saved by %d processes, now %d)",
                latest, start_iter, start_position, state["world_size"], world)
    return optimizer, start_iter, start_position


def _collapse_watch(cfg: DictConfig, world: int) -> CollapseWatch | None:
    """The run's collapse watch, or None when ``train.collapse_watch.enabled`` is false or it would see nothing."""
    if not cfg.train.collapse_watch.enabled:
        return None
    if not cfg.train.monitor_collapse:
        logger.warning("train.collapse_watch.enabled=true needs the monitors of train.monitor_collapse=true; "
                       "the collapse watch is off for this run.")
        return None
    return CollapseWatch.from_config(cfg, world)


def _period_record(it: int, done: int, per_epoch: int, reduced: torch.Tensor, values: dict[str, float],
                   grad_norm: torch.Tensor, meter: ThroughputMeter, losses: dict[str, torch.Tensor],
                   device: torch.device) -> dict[str, Any]:
    """The logging period's record (a line of training_metrics.json; collective: every rank calls it)."""
    record: dict[str, Any] = {"iteration": it, **dict(zip(LOSS_KEYS, reduced.tolist())), **values}
    record["epoch"] = done / per_epoch
    record["grad_norm"] = float(grad_norm)
    record.update(meter.summary())
    monitors = {k: v for k, v in losses.items() if k not in LOSS_KEYS}
    if "ibot_uniform_loss" in monitors:
        # The reduced iBOT loss is a mean over ranks of per-rank losses, each with its own masked
        # share: the mean of the per-rank uniform values is the line it collapses onto.
        monitors["ibot_uniform_loss"] = distributed.all_reduce_mean(monitors["ibot_uniform_loss"].float().to(device))
    record.update({k: float(v) for k, v in monitors.items()})
    return record


def _watch_step(watch: CollapseWatch | None, record: dict[str, Any], done: int, is_main: bool) -> str | None:
    """Feed the record to the watch (rank 0) and add ``collapse`` (active conditions) to it.

    Returns:
        The stop message when a warning was raised and ``train.collapse_watch.stop_run`` is
        true, else None; the same on every rank (collective when ``stop_run`` is true).
    """
    if watch is None:
        return None
    raised = watch.update(record) if is_main else []
    record["collapse"] = watch.active
    if not watch.settings.stop_run:
        return None
    # Only rank 0 watches; every rank must stop at the same iteration, or the others would
    # hang in the next collective.
    return distributed.broadcast_object(watch.stop_message(raised, done) if raised else None)


def train(cfg: DictConfig, output_dir: str | Path, resume: bool = True,
          device: torch.device | None = None, final_saves: bool = True) -> dict[str, Any]:
    """Run (or resume) pretraining; the process group, if any, must already exist.

    Args:
        cfg: resolved config from :func:`build_config`.
        output_dir: the run's folder.
        resume: continue from the latest checkpoint in ``output_dir/checkpoints`` if there is one.
        device: where to compute (from :func:`dinov2.distributed.init_distributed`); by default
            ``device`` resolved for one process.
        final_saves: write the training state and the teacher export after the last iteration.
            False skips those two end-of-training writes (for a throughput measurement: ~7 GB for
            ViT-L); the periodic ones (``checkpointing.period_iterations``,
            ``evaluation.eval_period_iterations``) are still written, also at the last iteration when
            a period ends there. A run without them cannot be resumed from its end, only from its
            last periodic checkpoint, and leaves no teacher export of its final weights.

    Returns:
        ``{"iteration", "start_iteration", "last_losses", "checkpoint", "teacher_export"}``; the
        last two are the latest written (None when there is none).

    Raises:
        NonFiniteLossError: a loss became NaN/Inf (the last good checkpoint is kept).
        CollapseError: a collapse warning with ``train.collapse_watch.stop_run=true`` (that
            iteration's teacher export and checkpoint are written first).
    """
    threads = torch.get_num_threads()
    if cfg.train.cpu_threads is not None:
        torch.set_num_threads(int(cfg.train.cpu_threads))
    try:
        result = _train(cfg, Path(output_dir), resume, device, final_saves)
    finally:
        torch.set_num_threads(threads)  # train() may run inside a larger program (tests, notebooks)
    if distributed.is_main_process():
        from dinov2.plot import plot_at_end  # noqa: PLC0415 - plot reads train's metrics: no import cycle

        plot_at_end(output_dir)
    return result


@dataclass(frozen=True)
class _RunPlan:
    """What a run fixes before its first iteration: processes, device, batch, iterations and periods."""

    rank: int
    world: int
    device: torch.device
    seed: int
    batch_size: int  # per process
    global_batch: int  # batch_size * world
    per_epoch: int
    max_iter: int
    log_period: int
    ckpt_period: int
    eval_period: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _run_plan(cfg: DictConfig, device: torch.device | None) -> _RunPlan:
    """The run's plan from the config and the process group.

    Raises:
        UsageError: nothing to train, or a logging, checkpoint or export period below 1.
    """
    rank, world = distributed.get_rank(), distributed.get_world_size()
    device = device if device is not None else resolve_device(str(cfg.device))
    seed = int(cfg.train.seed)
    batch_size = int(cfg.train.batch_size_per_gpu)
    per_epoch, max_iter = _iteration_plan(cfg)
    log_period = int(cfg.train.log_period_iterations)
    ckpt_period = int(cfg.checkpointing.period_iterations)
    eval_period = int(cfg.evaluation.eval_period_iterations)
    for key, period in (("train.log_period_iterations", log_period), ("checkpointing.period_iterations", ckpt_period),
                        ("evaluation.eval_period_iterations", eval_period)):
        if period < 1:
            raise UsageError(f"{key} must be >= 1, got {period} (a large value effectively disables it).")
    return _RunPlan(rank, world, device, seed, batch_size, batch_size * world, per_epoch, max_iter, log_period,
                    ckpt_period, eval_period)


def _prepare_output_dir(cfg: DictConfig, output_dir: Path, resume: bool, is_main: bool) -> TrainingCheckpointer:
    """The run's checkpointer; rank 0 creates ``output_dir`` and writes ``config.yaml`` there.

    Raises:
        UsageError: ``resume`` is false and the folder holds checkpoints of an earlier run.
    """
    checkpointer = TrainingCheckpointer(output_dir, int(cfg.checkpointing.max_to_keep))
    if not resume and checkpointer.list():
        # Mixing a fresh run's checkpoints with an older run's would let a later resume pick the wrong one.
        raise UsageError(f"{checkpointer.directory} holds checkpoints of an earlier run and --no-resume was given; "
                         "choose another --output-dir or delete that folder.")
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir)
    return checkpointer


def _checked_inputs(cfg: DictConfig, output_dir: Path, plan: _RunPlan) -> list[dict]:
    """The datalist's entries after the pre-flight: every problem at once before the first iteration.

    Every rank runs it (the same files give the same answer, so all ranks keep the same entries;
    after rank 0 the others mostly read the cache). ``train.skip_bad_inputs`` leaves bad volumes
    out and lists them in ``<output_dir>/skipped.tsv``.

    Raises:
        DatalistError: every bad entry (unless skipped), or no entry left.
    """
    return checked_pretrain_entries(
        cfg.train.datalist, skip=bool(cfg.train.skip_bad_inputs), report_dir=output_dir,
        read_voxels=bool(cfg.train.preflight), cache=PreflightCache(),
        progress=plan.is_main and bool(cfg.train.progress_bar))


def _data_loader(cfg: DictConfig, plan: _RunPlan, start_position: int, entries: list[dict]) -> tuple[Any, Any]:
    """The pretraining dataset (every rank sees all of it) and this rank's loader from ``start_position``.

    Args:
        entries: the checked datalist entries (:func:`_checked_inputs`).

    Returns:
        ``(dataset, loader)``; the loader yields this rank's batches of ``plan.batch_size`` samples.
    """
    dataset = build_pretrain_dataset(cfg, entries, seed=plan.seed, rank=0, world_size=1)
    # Crops cross from the loader in the dtype the volumes are stored in: float16 storage has
    # already rounded the data to float16, float32 keeps the crops exact.
    crop_dtype = getattr(torch, dataset.config["storage_dtype"])
    collate = make_collate_fn(cfg.ibot, int(cfg.student.patch_size), cfg.crops.global_crops_size, dtype=crop_dtype)
    loader = build_train_loader(dataset, collate, batch_size=plan.batch_size, run_seed=plan.seed,
                                start_position=start_position, rank=plan.rank, world_size=plan.world,
                                num_workers=int(cfg.train.num_workers), prefetch_factor=int(cfg.train.prefetch_factor),
                                pin_memory=plan.device.type == "cuda")
    return dataset, loader


def _progress_outputs(cfg: DictConfig, plan: _RunPlan, output_dir: Path, start_iter: int
                      ) -> tuple[MetricsLogger, ProgressBar, ThroughputMeter, CollapseWatch | None]:
    """The run's reporting (metrics file, progress bar, throughput meter, collapse watch); logs the plan.

    Returns:
        ``(metrics, bar, meter, watch)``; ``watch`` is None when the collapse watch is off.
    """
    metrics = MetricsLogger(output_dir, start_iter, enabled=plan.is_main, tensorboard=bool(cfg.train.tensorboard))
    bar = ProgressBar(plan.max_iter, start_iter, enabled=plan.is_main and bool(cfg.train.progress_bar))
    meter = ThroughputMeter()
    watch = _collapse_watch(cfg, plan.world)
    logger.info("Training iterations %d..%d, global batch %d on %d process(es), device %s",
                start_iter, plan.max_iter, plan.global_batch, plan.world, plan.device)
    logger.info("One line per %d iteration(s) below; 'dino 6.12/6.93' is a loss and its value for a uniform "
                "prediction (a run that stays there has collapsed), teacher_entropy is shown against ln K",
                plan.log_period)
    return metrics, bar, meter, watch


def _train_step(arch: SSLMetaArch, optimizer, scaler, schedules: dict, batch: dict, it: int, plan: _RunPlan,
                monitors: bool, last_checkpoint: Path | None
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, float], torch.Tensor]:
    """Iteration ``it``: seeded augmentation draws, scheduled values, forward/backward, optimizer and EMA updates.

    Args:
        batch: this rank's collated batch.
        monitors: compute the collapse monitors too (logging iterations with ``train.monitor_collapse``).
        last_checkpoint: named by the error when the loss is not finite.

    Returns:
        ``(losses, reduced, values, grad_norm)``: this rank's losses and monitors (0-d tensors), the
        :data:`LOSS_KEYS` averaged over ranks (shape ``(4,)``, on the CPU), the scheduled values of
        ``it`` and the gradient norm (0-d).

    Raises:
        NonFiniteLossError: on every rank together, before the optimizer step.
    """
    seed_training_step(plan.seed, it, plan.rank)
    values = {name: schedules[name][it] for name in ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr")}
    apply_optim_scheduler(optimizer, values["lr"], values["wd"], values["last_layer_lr"])
    losses = arch.forward_backward(batch, values["teacher_temp"], scaler, monitors=monitors)
    # Reduced on the compute device (NCCL cannot reduce CPU tensors), checked on every rank
    # so that all ranks stop together.
    reduced = distributed.all_reduce_mean(torch.stack([losses[k].float() for k in LOSS_KEYS])).cpu()
    if not torch.isfinite(reduced).all():
        terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(LOSS_KEYS, reduced.tolist()))
        raise NonFiniteLossError(
            f"Non-finite loss at iteration {it}: {terms}. The last good checkpoint is "
            f"{last_checkpoint or 'none (no checkpoint was written yet)'}; lower optim.base_lr or "
            "optim.clip_grad, or use compute_precision.dtype=fp32, and resume."
        )
    grad_norm = arch.optimizer_step(optimizer, scaler)
    arch.update_teacher(values["momentum"])
    return losses, reduced, values, grad_norm


def _log_period(it: int, plan: _RunPlan, reduced: torch.Tensor, values: dict[str, float], grad_norm: torch.Tensor,
                losses: dict[str, torch.Tensor], meter: ThroughputMeter, watch: CollapseWatch | None,
                metrics: MetricsLogger) -> str | None:
    """End of a logging period: the metrics record, the collapse watch, the progress line (collective).

    Args:
        reduced: the rank-averaged :data:`LOSS_KEYS`, shape ``(4,)``.

    Returns:
        The collapse stop message of :func:`_watch_step`, or None.
    """
    done = it + 1
    record = _period_record(it, done, plan.per_epoch, reduced, values, grad_norm, meter, losses, plan.device)
    stop = _watch_step(watch, record, done, plan.is_main)
    metrics.log(it, record)
    logger.info("%s", progress_line(record, done, plan.max_iter))
    meter.reset()
    return stop


def _export_teacher(arch: SSLMetaArch, cfg: DictConfig, output_dir: Path, done: int, is_main: bool,
                    previews: TeacherPreviews | None = None) -> Path | None:
    """Rank 0 writes ``eval/training_<done>/teacher_checkpoint.pth`` (collective), and the teacher's
    TensorBoard images at step ``done - 1`` (the step of that iteration's scalars) when ``previews`` is given.

    Returns:
        The export's path on rank 0, None on the other ranks.
    """
    export = None
    teacher = arch.teacher_state_dict()
    if is_main:
        export = save_teacher_checkpoint(
            output_dir / "eval" / f"training_{done}" / "teacher_checkpoint.pth", teacher, cfg, done)
        logger.info("Teacher export after %d iterations: %s", done, export)
        if previews is not None:
            previews.write(teacher, step=done - 1)
    distributed.barrier()
    return export


def _save_checkpoint(checkpointer: TrainingCheckpointer, arch: SSLMetaArch, optimizer, scaler, done: int,
                     position: int, sampler_seed: int, dataset_size: int, cfg: DictConfig) -> Path | None:
    """Save the training state after ``done`` iterations, ``position`` samples into the stream (collective).

    Returns:
        The checkpoint's path where this rank wrote it (rank 0), else None.
    """
    state = _training_state(arch, optimizer, scaler, done, position, sampler_seed, dataset_size, cfg)
    path = checkpointer.save(state)
    distributed.barrier()
    return path


def _train(cfg: DictConfig, output_dir: Path, resume: bool, device: torch.device | None,
           final_saves: bool) -> dict[str, Any]:
    plan = _run_plan(cfg, device)
    final_save_at = plan.max_iter if final_saves else None  # the iteration that saves because the run ends there
    checkpointer = _prepare_output_dir(cfg, output_dir, resume, plan.is_main)
    entries = _checked_inputs(cfg, output_dir, plan)
    torch.manual_seed(plan.seed)  # identical initial weights on every rank
    arch = SSLMetaArch(cfg, plan.device)
    scaler = torch.amp.GradScaler(plan.device.type) if arch.autocast_dtype == torch.float16 else None
    schedules = build_schedulers(cfg, plan.per_epoch, plan.global_batch)
    latest = checkpointer.latest() if resume else None
    distributed.barrier()  # rank 0 may have removed stray temporary files
    optimizer, start_iter, start_position = _start_or_resume(arch, scaler, cfg, latest, plan.global_batch)
    dataset, loader = _data_loader(cfg, plan, start_position, entries)
    metrics, bar, meter, watch = _progress_outputs(cfg, plan, output_dir, start_iter)
    previews = TeacherPreviews(metrics.tensorboard, dataset, cfg) if metrics.tensorboard.active else None

    last_checkpoint, last_export, reduced = latest, None, None
    # Only this frame holds the iterator (helpers get batches): `del stream` below then stops the
    # workers even while an exception's traceback keeps the helpers' frames alive.
    stream = iter(loader)
    arch.train()
    try:
        for it in range(start_iter, plan.max_iter):
            wait_start = time.perf_counter()
            batch = next(stream)
            data_wait = time.perf_counter() - wait_start
            batch = batch_to_device(batch, plan.device)
            done = it + 1
            log_now = done % plan.log_period == 0 or done == plan.max_iter
            losses, reduced, values, grad_norm = _train_step(
                arch, optimizer, scaler, schedules, batch, it, plan,
                monitors=log_now and bool(cfg.train.monitor_collapse), last_checkpoint=last_checkpoint)
            meter.add(data_wait, plan.global_batch)
            stop = _log_period(it, plan, reduced, values, grad_norm, losses, meter, watch, metrics) if log_now else None
            bar.update({"loss": float(reduced[0]), "collapse": watch.active_short if watch else ""})
            # Export before the checkpoint of the same iteration: a checkpoint at k then implies the
            # export at k exists, even if the run is killed between the two writes. A stopped run
            # saves its last iteration too, to inspect it or to resume with stop_run=false.
            if stop or done % plan.eval_period == 0 or done == final_save_at:
                last_export = _export_teacher(arch, cfg, output_dir, done, plan.is_main, previews)
            if stop or done % plan.ckpt_period == 0 or done == final_save_at:
                position = start_position + (done - start_iter) * plan.global_batch
                last_checkpoint = _save_checkpoint(checkpointer, arch, optimizer, scaler, done, position, plan.seed,
                                                   len(dataset), cfg) or last_checkpoint
            if stop:
                saved = (f" Saved: training state {last_checkpoint}, teacher export {last_export}."
                         if plan.is_main else "")
                raise CollapseError(stop + saved)
    finally:
        bar.close()
        metrics.close()
        del stream  # stops the loader's worker processes
    return {
        "iteration": plan.max_iter,
        "start_iteration": start_iter,
        "last_losses": dict(zip(LOSS_KEYS, reduced.tolist())) if reduced is not None else None,
        "checkpoint": last_checkpoint,
        "teacher_export": last_export,
    }


def _plain_text(rst: str) -> str:
    """The module docstring as a terminal shows it: reST markup (``x``, :mod:`x`, ``::``) removed."""
    text = re.sub(r":\w+:`([^`]+)`", r"\1", rst)
    return text.replace("``", "").replace("::\n", ":\n")


def get_args_parser() -> argparse.ArgumentParser:
    """The command line; ``--help`` shows the module docstring (launch examples, config merge order)."""
    # The docstring is the one description of how to launch and configure a run: --help shows it
    # rather than a copy that would drift from it. Raw formatting keeps the examples' lines.
    # (__doc__ is None under python -OO.)
    summary, _, details = _plain_text(__doc__ or "").partition("\n\n")
    parser = argparse.ArgumentParser(
        prog="python -m dinov2.train.train3d",
        description=summary,
        epilog=details,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", default=None,
                        help="YAML merged over the packaged defaults (a path or a packaged name like train/vit3d_highres)")
    parser.add_argument("--output-dir", required=True, help="run folder: config, metrics, checkpoints, teacher exports")
    parser.add_argument("--cache-dir", default=None, help="disk cache of preprocessed volumes (preprocessing.cache.dir)")
    add_device_argument(parser)
    parser.add_argument("--skip-bad-inputs", action="store_true",
                        help="leave volumes that cannot be used out (listed in <output-dir>/skipped.tsv) instead of "
                             "failing (train.skip_bad_inputs)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard scalars and teacher images to <output-dir>/tensorboard "
                             "(train.tensorboard; needs the tensorboard extra)")
    parser.add_argument("--no-resume", action="store_true",
                        help="never resume: start at iteration 0 (refused if the output folder holds checkpoints)")
    add_debug_flag(parser)
    parser.add_argument("overrides", nargs="*", default=[], help="key=value config overrides, e.g. optim.epochs=10")
    return parser


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Pretrain; returns the exit code: 0, or 1 after one ``ERROR:`` line on stderr for a user error
    (a config key or value, a missing file, a datalist, out of memory, a non-finite loss, a collapse
    with ``stop_run``), which ``log.txt`` records too. ``--debug`` raises it with its traceback."""
    # Intermixed: key=value overrides may come before, between or after the flags.
    args = get_args_parser().parse_intermixed_args(argv)
    # Third-party warnings in the one log format; dinov2's own records go through _setup_logging.
    start_entry_point(logging.WARNING)
    # Every ValueError or OmegaConf error while building the config is about the YAML or overrides.
    with user_input(ValueError, OmegaConfBaseException):
        cfg = build_config(args.config_file, args.overrides, args.cache_dir, args.device, args.skip_bad_inputs,
                           args.tensorboard)
    ctx = distributed.init_distributed(str(cfg.device))
    output_dir = Path(args.output_dir)
    if ctx.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    handlers, previous_logging = _setup_logging(output_dir, ctx.is_main_process)
    memory_advice = ("Lower train.batch_size_per_gpu, crops.global_crops_size / crops.local_crops_size or "
                     "crops.local_crops_number, or use a smaller student.arch; on GPU, bf16 "
                     "(compute_precision) and gradient checkpointing also save memory.")
    disk_advice = (f"Free space under {output_dir} (checkpointing.max_to_keep limits how many training states "
                   "are kept) and under the preprocessing cache (--cache-dir), or point them at a larger disk.")
    try:
        with explained_resource_errors(memory_advice, disk_advice):
            train(cfg, output_dir, resume=not args.no_resume, device=ctx.device)
    except UserError as exc:
        # ResourceError, NonFiniteLossError, CollapseError (an outcome the user asked for with
        # stop_run), DatalistError...: the entry point prints one ERROR line on stderr; log.txt
        # keeps it too. A collapse stops every rank at the same iteration: rank 0 speaks for all.
        _log_to_file(handlers, exc)
        if isinstance(exc, CollapseError) and not ctx.is_main_process:
            return 1
        raise
    finally:
        _teardown_logging(handlers, previous_logging)
        distributed.shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
