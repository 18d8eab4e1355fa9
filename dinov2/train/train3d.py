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
``train/vit3d_highres``) <- ``key=value`` overrides. The resolved config goes to
``<output-dir>/config.yaml``. ``train.num_workers`` is lowered to the CPUs available to the
process minus one when it asks for more.

Outputs in ``--output-dir``: ``training_metrics.json`` (one JSON line per logging step),
``checkpoints/model_<iter>.pth`` (full training state, the last K), ``eval/training_<iter>/
teacher_checkpoint.pth`` (teacher exports, ``<iter>`` = completed iterations), ``log.txt`` (one
progress line per logging period, every export and checkpoint, collapse warnings).
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
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from dinov2 import distributed
from dinov2.checkpoints.layouts import read_checkpoint
from dinov2.checkpoints.teacher_export import save_teacher_checkpoint
from dinov2.checkpoints.training_state import TrainingCheckpointer
from dinov2.data.collate import make_collate_fn
from dinov2.data.datasets import build_pretrain_dataset
from dinov2.data.loader import build_train_loader, seed_training_step
from dinov2.data.samplers import InfiniteSampler
from dinov2.optim.param_groups import apply_optim_scheduler
from dinov2.optim.schedules import build_schedulers
from dinov2.train.collapse import CollapseError, CollapseWatch
from dinov2.train.metrics import MetricsLogger, ProgressBar, ThroughputMeter, progress_line
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.allocator import tune_cpu_allocator
from dinov2.utils.config import (
    config_to_dict,
    load_yaml,
    merge_configs,
    packaged_config_path,
    save_config,
    unknown_keys,
)
from dinov2.utils.device import resolve_device
from dinov2.utils.errors import ResourceError, explained_resource_errors
from dinov2.utils.rng import capture_rng_state, restore_rng_state

logger = logging.getLogger("dinov2.train")

LOSS_KEYS = ("total_loss", "dino_loss", "ibot_loss", "koleo_loss")


class NonFiniteLossError(FloatingPointError):
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


def _config_file(name: str | None) -> Path | None:
    if not name:
        return None
    path = Path(name)
    if path.is_file():
        return path
    try:
        return packaged_config_path(name)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--config-file {name}: no such file, nor a packaged config. {exc}") from exc


def build_config(config_file: str | None = None, overrides: Sequence[str] = (), cache_dir: str | None = None) -> DictConfig:
    """Resolved training config: defaults <- ``config_file`` <- ``overrides``.

    Args:
        config_file: a YAML path or a packaged name (``train/vit3d_highres``).
        overrides: ``key=value`` strings.
        cache_dir: sets ``preprocessing.cache.dir`` (the ``--cache-dir`` flag).

    Raises:
        ValueError: keys the defaults do not know (typos) or required values left as ``???``
            (in the defaults, or in ``config_file`` and not set by ``overrides``).
    """
    overrides = list(overrides) + ([f"preprocessing.cache.dir={cache_dir}"] if cache_dir else [])
    default = default_config()
    path = _config_file(config_file)
    cfg = merge_configs(default, path, overrides)
    unknown = unknown_keys(cfg, default)
    if unknown:
        raise ValueError(f"Unknown config keys {unknown}: not in dinov2/configs/ssl3d_default_config.yaml or "
                         "data_defaults.yaml. Fix the spelling in your YAML / overrides.")
    missing = set(OmegaConf.missing_keys(cfg))
    if path is not None:
        # OmegaConf does not let a ``???`` replace a default value in a merge, so a ``???`` in the
        # config file (e.g. the teacher a stage starts from) is enforced here: overrides must set it.
        given = {item.split("=", 1)[0].strip() for item in overrides}
        missing |= {key for key in OmegaConf.missing_keys(load_yaml(path)) if key not in given}
    missing = sorted(missing)
    if missing:
        raise ValueError(f"Config values {missing} are required (??? in the defaults); pass them as key=value, "
                         f"e.g. {missing[0]}=...")
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
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if is_main:
        handlers.append(logging.FileHandler(output_dir / "log.txt"))
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    return handlers, previous


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
        raise ValueError(f"Nothing to train: optim.epochs * train.iterations_per_epoch (or train.max_iterations) = {total}.")
    return per_epoch, total


def _load_pretrained(arch: SSLMetaArch, path: str) -> None:
    contents = read_checkpoint(path)
    state = {f"backbone.{k}": v for k, v in contents.backbone.items()}
    for head in ("dino_head", "ibot_head"):
        if head not in contents.heads:
            raise ValueError(f"{path} has no {head}; student.pretrained_weights must be a teacher export with both heads.")
        state.update({f"{head}.{k}": v for k, v in contents.heads[head].items()})
    arch.load_pretrained_teacher(state)
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
          device: torch.device | None = None) -> dict[str, Any]:
    """Run (or resume) pretraining; the process group, if any, must already exist.

    Args:
        cfg: resolved config from :func:`build_config`.
        output_dir: the run's folder.
        resume: continue from the latest checkpoint in ``output_dir/checkpoints`` if there is one.
        device: where to compute (from :func:`dinov2.distributed.init_distributed`); by default
            ``train.device`` resolved for one process.

    Returns:
        ``{"iteration", "start_iteration", "last_losses", "checkpoint", "teacher_export"}``.

    Raises:
        NonFiniteLossError: a loss became NaN/Inf (the last good checkpoint is kept).
        CollapseError: a collapse warning with ``train.collapse_watch.stop_run=true`` (that
            iteration's teacher export and checkpoint are written first).
    """
    threads = torch.get_num_threads()
    if cfg.train.cpu_threads is not None:
        torch.set_num_threads(int(cfg.train.cpu_threads))
    try:
        return _train(cfg, Path(output_dir), resume, device)
    finally:
        torch.set_num_threads(threads)  # train() may run inside a larger program (tests, notebooks)


def _train(cfg: DictConfig, output_dir: Path, resume: bool, device: torch.device | None) -> dict[str, Any]:
    rank, world = distributed.get_rank(), distributed.get_world_size()
    is_main = rank == 0
    device = device if device is not None else resolve_device(str(cfg.train.device))
    seed = int(cfg.train.seed)
    batch_size = int(cfg.train.batch_size_per_gpu)
    global_batch = batch_size * world
    per_epoch, max_iter = _iteration_plan(cfg)
    log_period = int(cfg.train.log_period_iterations)
    ckpt_period = int(cfg.checkpointing.period_iterations)
    eval_period = int(cfg.evaluation.eval_period_iterations)
    for key, period in (("train.log_period_iterations", log_period), ("checkpointing.period_iterations", ckpt_period),
                        ("evaluation.eval_period_iterations", eval_period)):
        if period < 1:
            raise ValueError(f"{key} must be >= 1, got {period} (a large value effectively disables it).")
    checkpointer = TrainingCheckpointer(output_dir, int(cfg.checkpointing.max_to_keep))
    if not resume and checkpointer.list():
        # Mixing a fresh run's checkpoints with an older run's would let a later resume pick the wrong one.
        raise ValueError(f"{checkpointer.directory} holds checkpoints of an earlier run and --no-resume was given; "
                         "choose another --output-dir or delete that folder.")
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir)

    torch.manual_seed(seed)  # identical initial weights on every rank
    arch = SSLMetaArch(cfg, device)
    scaler = torch.amp.GradScaler(device.type) if arch.autocast_dtype == torch.float16 else None
    schedules = build_schedulers(cfg, per_epoch, global_batch)

    latest = checkpointer.latest() if resume else None
    distributed.barrier()  # rank 0 may have removed stray temporary files
    optimizer, start_iter, start_position = _start_or_resume(arch, scaler, cfg, latest, global_batch)

    dataset = build_pretrain_dataset(cfg, cfg.train.datalist, seed=seed, rank=0, world_size=1)
    collate = make_collate_fn(cfg.ibot, int(cfg.student.patch_size), cfg.crops.global_crops_size)
    loader = build_train_loader(dataset, collate, batch_size=batch_size, run_seed=seed, start_position=start_position,
                                rank=rank, world_size=world, num_workers=int(cfg.train.num_workers),
                                prefetch_factor=int(cfg.train.prefetch_factor), pin_memory=device.type == "cuda")
    metrics = MetricsLogger(output_dir, start_iter, enabled=is_main, tensorboard=bool(cfg.train.tensorboard))
    bar = ProgressBar(max_iter, start_iter, enabled=is_main and bool(cfg.train.progress_bar))
    meter = ThroughputMeter()
    watch = _collapse_watch(cfg, world)
    logger.info("Training iterations %d..%d, global batch %d on %d process(es), device %s",
                start_iter, max_iter, global_batch, world, device)
    logger.info("One line per %d iteration(s) below; 'dino 6.12/6.93' is a loss and its value for a uniform "
                "prediction (a run that stays there has collapsed), teacher_entropy is shown against ln K", log_period)

    last_checkpoint, last_export, reduced = latest, None, None
    stream = iter(loader)
    arch.train()
    try:
        for it in range(start_iter, max_iter):
            wait_start = time.perf_counter()
            batch = next(stream)
            data_wait = time.perf_counter() - wait_start
            seed_training_step(seed, it, rank)
            values = {name: schedules[name][it] for name in ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr")}
            apply_optim_scheduler(optimizer, values["lr"], values["wd"], values["last_layer_lr"])
            done = it + 1
            log_now = done % log_period == 0 or done == max_iter
            losses = arch.forward_backward(batch, values["teacher_temp"], scaler,
                                           monitors=log_now and bool(cfg.train.monitor_collapse))
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
            meter.add(data_wait, global_batch)

            stop = None
            if log_now:
                record = _period_record(it, done, per_epoch, reduced, values, grad_norm, meter, losses, device)
                stop = _watch_step(watch, record, done, is_main)
                metrics.log(it, record)
                logger.info("%s", progress_line(record, done, max_iter))
                meter.reset()
            bar.update({"loss": float(reduced[0]), "collapse": watch.active_short if watch else ""})
            # Export before the checkpoint of the same iteration: a checkpoint at k then implies the
            # export at k exists, even if the run is killed between the two writes. A stopped run
            # saves its last iteration too, to inspect it or to resume with stop_run=false.
            if stop or done % eval_period == 0 or done == max_iter:
                teacher = arch.teacher_state_dict()
                if is_main:
                    last_export = save_teacher_checkpoint(
                        output_dir / "eval" / f"training_{done}" / "teacher_checkpoint.pth", teacher, cfg, done)
                    logger.info("Teacher export after %d iterations: %s", done, last_export)
                distributed.barrier()
            if stop or done % ckpt_period == 0 or done == max_iter:
                position = start_position + (done - start_iter) * global_batch
                state = _training_state(arch, optimizer, scaler, done, position, seed, len(dataset), cfg)
                path = checkpointer.save(state)
                last_checkpoint = path or last_checkpoint
                distributed.barrier()
            if stop:
                saved = f" Saved: training state {last_checkpoint}, teacher export {last_export}." if is_main else ""
                raise CollapseError(stop + saved)
    finally:
        bar.close()
        metrics.close()
        del stream  # stops the loader's worker processes
    return {
        "iteration": max_iter,
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
    parser.add_argument("--no-resume", action="store_true",
                        help="never resume: start at iteration 0 (refused if the output folder holds checkpoints)")
    parser.add_argument("overrides", nargs="*", default=[], help="key=value config overrides, e.g. optim.epochs=10")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    cfg = build_config(args.config_file, args.overrides, args.cache_dir)
    ctx = distributed.init_distributed(str(cfg.train.device))
    output_dir = Path(args.output_dir)
    if ctx.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    handlers, previous_logging = _setup_logging(output_dir, ctx.is_main_process)
    tune_cpu_allocator()
    memory_advice = ("Lower train.batch_size_per_gpu, crops.global_crops_size / crops.local_crops_size or "
                     "crops.local_crops_number, or use a smaller student.arch; on GPU, bf16 "
                     "(compute_precision) and gradient checkpointing also save memory.")
    disk_advice = (f"Free space under {output_dir} (checkpointing.max_to_keep limits how many training states "
                   "are kept) and under the preprocessing cache (--cache-dir), or point them at a larger disk.")
    try:
        with explained_resource_errors(memory_advice, disk_advice):
            train(cfg, output_dir, resume=not args.no_resume, device=ctx.device)
    except ResourceError as exc:
        logger.error("%s", exc)
        raise
    except NonFiniteLossError as exc:
        logger.error("%s", exc)
        raise
    except CollapseError as exc:
        # An outcome the user asked for (stop_run), not a bug: one line (every rank stopped at the
        # same iteration; rank 0 speaks for all), no traceback.
        if ctx.is_main_process:
            logger.error("%s", exc)
        return 1
    finally:
        _teardown_logging(handlers, previous_logging)
        distributed.shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
