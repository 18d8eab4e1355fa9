"""Finetune a pretrained 3D ViT for volumetric segmentation (flags, config merge, run).

Recipe (CPU or one GPU)::

    python -m dinov2.sample_data --out demo_data --labels tissue
    python -m dinov2.eval.segmentation \\
        --pretrained-weights output/eval/training_12499/teacher_checkpoint.pth \\
        --output-dir seg_out --dataset-name brain_tissue --base-data-dir demo_data \\
        --segmentation-head UNETR --epochs 10 --epoch-length 50 --eval-iters 100
    python -m dinov2.eval.segmentation.predict --checkpoint seg_out/best_model.pth --input scan.nii.gz --output preds

``--dataset-name`` is a packaged preset (``btcv``, ``brats``, ``la``, ``brain_tissue``) or the
path of a preset YAML (see :mod:`dinov2.eval.presets`); ``--base-data-dir`` holds
the datalist JSON it names. ``--pretrained-weights none`` trains from a random initialisation
(a baseline). Trailing ``key=value`` pairs override any config key. Merge order: packaged
``eval/segmentation_default.yaml`` ← preset (as ``dataset``) ← ``--config-file`` ← flags ←
``key=value``.
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

from omegaconf import OmegaConf

from dinov2.eval.presets import load_preset
from dinov2.utils.config import load_yaml, merge_configs, packaged_config_path, unknown_keys
from dinov2.utils.entry_point import start_entry_point

from .model import HEAD_NAMES, canonical_head_name

logger = logging.getLogger("dinov2.eval.segmentation")

# flag dest -> config key
FLAG_KEYS = {
    "pretrained_weights": "pretrained_weights", "output_dir": "output_dir", "dataset_name": "dataset_name",
    "base_data_dir": "base_data_dir", "dataset_percent": "dataset_percent", "segmentation_head": "model.head",
    "epochs": "optim.epochs", "epoch_length": "optim.epoch_length", "eval_iters": "train.eval_iters",
    "warmup_iters": "optim.warmup_iters", "batch_size": "train.batch_size", "num_workers": "train.num_workers",
    "learning_rate": "optim.lr", "cache_dir": "train.cache_dir", "resize_scale": "dataset.resize_scale",
    "seed": "seed", "device": "train.device",
}


def get_args_parser() -> argparse.ArgumentParser:
    """The command line (the flags 3DINO users know, plus ``key=value`` overrides)."""
    p = argparse.ArgumentParser(prog="python -m dinov2.eval.segmentation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=None, help="YAML merged over the defaults and the preset")
    p.add_argument("--pretrained-weights", help="teacher checkpoint (ours or published 3DINO-ViT), or 'none'")
    p.add_argument("--output-dir", help="where config, checkpoints and results.json go")
    p.add_argument("--dataset-name", help="packaged preset (btcv, brats, la, brain_tissue) or a preset YAML path")
    p.add_argument("--base-data-dir", help="folder holding the datalist JSON")
    p.add_argument("--dataset-percent", type=float, help="%% of the training cases to use")
    p.add_argument("--segmentation-head", choices=HEAD_NAMES, type=canonical_head_name)
    p.add_argument("--train-feature-model", action="store_true", help="finetune the backbone (layer-wise LR decay)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--epoch-length", type=int, help="iterations per epoch")
    p.add_argument("--eval-iters", type=int, help="validate every N iterations")
    p.add_argument("--warmup-iters", type=int)
    p.add_argument("--image-size", type=int, help="cubic training crop / sliding window side (dataset.roi_size)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--cache-dir", help="on-disk cache of preprocessed volumes")
    p.add_argument("--resize-scale", type=float, help="resample to preset spacing / scale (2 = twice the voxels per axis)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to train and evaluate (train.device; "
                   "auto = CUDA when available), as in the other entry points")
    p.add_argument("opts", nargs="*", default=[], help="key=value config overrides")
    return p


def build_config(args: argparse.Namespace):
    """Merge defaults ← preset ← config file ← flags ← ``key=value`` and check required keys."""
    flags = []
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            flags.append(f"{key}={value}" if not isinstance(value, str) else f"{key}={_quote(value)}")
    if args.train_feature_model:
        flags.append("model.train_backbone=true")
    if args.image_size is not None:
        flags.append(f"dataset.roi_size=[{args.image_size},{args.image_size},{args.image_size}]")
    # The preset name may come from the config file or the flags: look for it before merging.
    probe = merge_configs("eval/segmentation_default", args.config_file, flags + list(args.opts))
    dataset_name = probe.get("dataset_name")
    if dataset_name in (None, "???"):
        raise ValueError("No dataset: pass --dataset-name (a packaged preset or a preset YAML path).")
    default = OmegaConf.merge(load_yaml(packaged_config_path("eval/segmentation_default")),
                              {"dataset": load_preset(dataset_name)})
    cfg = merge_configs(default, args.config_file, flags + list(args.opts))
    typos = [k for k in unknown_keys(cfg, default) if not k.startswith(("model.backbone_kwargs.", "dataset."))]
    if typos:
        logger.warning("Config keys unknown to the defaults (typos?): %s", ", ".join(typos))
    missing = [k for k in ("pretrained_weights", "output_dir", "base_data_dir") if OmegaConf.is_missing(cfg, k)]
    if missing:
        raise ValueError(f"Missing {', '.join(missing)}: pass --{missing[0].replace('_', '-')} (or set it in "
                         "--config-file). Use --pretrained-weights none for a random-initialisation baseline.")
    return cfg


def _quote(value: str) -> str:
    # OmegaConf's dotlist parses unquoted values as YAML; quote paths so ':' or leading digits stay strings.
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def main(argv: Sequence[str] | None = None) -> int:
    """Run finetuning; returns the process exit code."""
    # Intermixed: key=value overrides may come before, between or after the flags.
    args = get_args_parser().parse_intermixed_args(argv)
    start_entry_point()
    from dinov2.checkpoints.errors import CheckpointError
    from dinov2.utils.errors import explained_resource_errors

    from .train_loop import run_finetuning  # heavy imports after argument parsing

    try:
        cfg = build_config(args)
        memory_advice = ("Lower --batch-size, --image-size (training crop and sliding window), "
                         "evaluation.sw_batch_size or the head's width (model.unetr.feature_size); without "
                         "--train-feature-model the backbone needs no gradients.")
        disk_advice = f"Free space under {cfg.output_dir} and the dataset cache (--cache-dir), or use a larger disk."
        with explained_resource_errors(memory_advice, disk_advice):
            results = run_finetuning(cfg)
    except (FileNotFoundError, ValueError, CheckpointError) as exc:
        # A wrong path, dataset, flag or resume mismatch is the user's to fix: one line that
        # names the file and the fix, not a traceback (as linear, visualisation and predict do).
        logger.error("%s", exc)
        return 1
    test = results.get("test")
    if test:
        print(f"test mean foreground Dice {test['summary']['mean_dice']:.4f} "
              f"(best validation iteration {test['iteration']}); see {cfg.output_dir}/results.json")
    return 0

