"""Finetune a pretrained 3D ViT for volumetric segmentation (flags, config merge, run).

Recipe (CPU or one GPU)::

    python -m dinov2.sample_data --out demo_data --labels tissue
    python -m dinov2.eval.segmentation \\
        --pretrained-weights output/eval/training_12499/teacher_checkpoint.pth \\
        --output-dir seg_out --dataset-name brain_tissue --base-data-dir demo_data \\
        --segmentation-head UNETR --epochs 10 --epoch-length 50 --eval-period-iterations 100
    python -m dinov2.eval.segmentation.predict --checkpoint seg_out/best_model.pth --input scan.nii.gz --output preds

``--dataset-name`` is a packaged preset (``btcv``, ``brats``, ``la``, ``brain_tissue``) or the
path of a preset YAML (see :mod:`dinov2.eval.presets`); ``--base-data-dir`` holds
the datalist JSON it names. ``--pretrained-weights none`` trains from a random initialisation
(a baseline). Trailing ``key=value`` pairs override any config key. Merge order: packaged
``eval/segmentation_default.yaml`` ← preset (as ``dataset``) ← ``--config-file`` ← flags ←
``key=value``; a key the defaults do not define is an error (docs/configuration.md lists them).
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from dinov2.eval.presets import add_dataset_arguments, dataset_flags, load_preset
from dinov2.utils.config import ConfigError, load_config
from dinov2.utils.device import add_device_argument
from dinov2.utils.precision import PRECISIONS
from dinov2.utils.entry_point import add_debug_flag, entry_point, start_entry_point

from .model import HEAD_NAMES, canonical_head_name

logger = logging.getLogger("dinov2.eval.segmentation")

DEFAULT_CONFIG = "eval/segmentation_default"
# flag dest -> config key of the flags of add_training_arguments (shared with dinov2.eval.instances train)
TRAINING_FLAG_KEYS = {
    "pretrained_weights": "pretrained_weights", "output_dir": "output_dir", "epochs": "optim.epochs",
    "epoch_length": "optim.epoch_length", "eval_period_iterations": "evaluation.eval_period_iterations",
    "warmup_iters": "optim.warmup_iters", "batch_size": "train.batch_size", "num_workers": "train.num_workers",
    "learning_rate": "optim.lr", "seed": "seed", "device": "device", "precision": "compute_precision.dtype",
    "train_feature_model": "model.train_backbone", "tensorboard": "train.tensorboard",
}
# flag dest -> config key (the dataset flags: dinov2.eval.presets.DATASET_FLAG_KEYS, as in linear probing)
FLAG_KEYS = {**TRAINING_FLAG_KEYS, "segmentation_head": "model.head", "cache_dir": "train.cache_dir",
             "resize_scale": "dataset.resize_scale"}
# Required values and the flag that gives each.
REQUIRED = {"pretrained_weights": "--pretrained-weights", "output_dir": "--output-dir",
            "dataset.base_data_dir": "--base-data-dir"}


def get_args_parser() -> argparse.ArgumentParser:
    """The command line (the flags 3DINO users know, plus ``key=value`` overrides)."""
    p = argparse.ArgumentParser(prog="python -m dinov2.eval.segmentation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=None, help="YAML merged over the defaults and the preset")
    p.add_argument("--pretrained-weights", help="teacher checkpoint (ours or published 3DINO-ViT), or 'none'")
    p.add_argument("--output-dir", help="where config, checkpoints and results.json go")
    add_dataset_arguments(p, "training crop and sliding window", image_size_triple=False)
    p.add_argument("--segmentation-head", choices=HEAD_NAMES, type=canonical_head_name)
    p.add_argument("--cache-dir", help="on-disk cache of preprocessed volumes")
    p.add_argument("--resize-scale", type=float, help="resample to preset spacing / scale (2 = twice the voxels per axis)")
    add_training_arguments(p, "TensorBoard scalars and validation previews")
    return p


def add_training_arguments(p: argparse.ArgumentParser, tensorboard_holds: str) -> None:
    """The training flags (:data:`TRAINING_FLAG_KEYS`), ``key=value`` overrides and ``--debug``, last on the
    command line of segmentation and instance segmentation finetuning (``tensorboard_holds``: what
    ``--tensorboard`` writes)."""
    p.add_argument("--train-feature-model", action="store_true", default=None,
                   help="finetune the backbone (layer-wise LR decay; model.train_backbone)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--epoch-length", type=int, help="iterations per epoch")
    p.add_argument("--eval-period-iterations", "--eval-iters", dest="eval_period_iterations", type=int,
                   help="validate every N iterations (evaluation.eval_period_iterations)")
    p.add_argument("--warmup-iters", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--seed", type=int)
    add_device_argument(p)
    p.add_argument("--precision", choices=("auto", *PRECISIONS),
                   help="autocast precision of training and evaluation (compute_precision.dtype)")
    p.add_argument("--tensorboard", action="store_true", default=None,
                   help=f"also write {tensorboard_holds} to <output-dir>/tensorboard (train.tensorboard; needs the "
                        "tensorboard extra)")
    p.add_argument("opts", nargs="*", default=[], help="key=value config overrides")
    add_debug_flag(p)


def check_required(cfg: DictConfig, required: dict[str, str]) -> None:
    """Raise :class:`ConfigError` naming the first of ``required`` (``{config key: flag}``) left ``???``."""
    unset = OmegaConf.missing_keys(cfg)  # dotted keys; OmegaConf.is_missing reads top-level keys only
    missing = [k for k in required if k in unset]
    if missing:
        raise ConfigError(f"Missing {', '.join(missing)}: pass {required[missing[0]]} (or set {missing[0]} in "
                          "--config-file). Use --pretrained-weights none for a random-initialisation baseline.")


def build_config(args: argparse.Namespace) -> DictConfig:
    """Merge defaults ← preset ← config file ← flags ← ``key=value`` and check required keys.

    Raises:
        ConfigError: an unknown key (named with its file or the command line and the closest
            known key), no dataset, or a required value not given.
        FileNotFoundError: the config file or the preset does not exist.
    """
    flags = {key: getattr(args, dest, None) for dest, key in FLAG_KEYS.items()}
    flags.update(dataset_flags(args))
    cfg = load_config(DEFAULT_CONFIG, args.config_file, flags, args.opts, preset_loader=load_preset,
                      open_keys=("model.backbone_kwargs",))
    if OmegaConf.is_missing(cfg, "dataset.name"):
        raise ConfigError("No dataset: pass --dataset-name (a packaged preset or a preset YAML path).")
    check_required(cfg, REQUIRED)
    return cfg


# A wrong path, dataset, flag or resume mismatch is the user's to fix: every ValueError of this
# command is such a message, printed as one ERROR line (as linear, visualisation and predict do).
@entry_point(user_errors=(ValueError,))
def main(argv: Sequence[str] | None = None) -> int:
    """Run finetuning; returns the process exit code (1 with one ``ERROR:`` line for a user error)."""
    # Intermixed: key=value overrides may come before, between or after the flags.
    args = get_args_parser().parse_intermixed_args(argv)
    start_entry_point()
    from dinov2.utils.errors import explained_resource_errors

    from .train_loop import run_finetuning  # heavy imports after argument parsing

    cfg = build_config(args)
    memory_advice = ("Lower --batch-size, --image-size (training crop and sliding window), "
                     "evaluation.sw_batch_size or the head's width (model.unetr.feature_size); without "
                     "--train-feature-model the backbone needs no gradients.")
    disk_advice = f"Free space under {cfg.output_dir} and the dataset cache (--cache-dir), or use a larger disk."
    with explained_resource_errors(memory_advice, disk_advice):
        results = run_finetuning(cfg)
    test = results.get("test")
    if test:
        print(f"test mean foreground Dice {test['summary']['mean_dice']:.4f} "
              f"(best validation iteration {test['iteration']}); see {cfg.output_dir}/results.json")
    return 0

