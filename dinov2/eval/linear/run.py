"""Linear probing of a frozen 3D ViT (``python -m dinov2.eval.linear``): features once, a grid of heads.

Recipe: the backbone's features of every volume are extracted once and cached
(:mod:`dinov2.eval.linear.features`); a grid of linear heads, {last 1, last 4 blocks} x {CLS,
CLS + mean patch token} x learning rates, is trained together on them
(:mod:`dinov2.eval.linear.classifiers`); the head with the best validation accuracy is evaluated
on the test split (accuracy, balanced accuracy, macro AUROC, confusion matrix, and each test
entry's prediction under ``test.cases`` for paired comparisons) and written to
``<output-dir>/results.json``. Each validation of the grid is a line of ``metrics.jsonl``;
``--tensorboard`` also writes every head's training loss and validation accuracy to
``<output-dir>/tensorboard/``.

Example on the packaged brain-lobe task (CPU, a minute)::

    python -m dinov2.sample_data.classification --out data/brain_lobes
    python -m dinov2.eval.linear --pretrained-weights out/eval/training_99/teacher_checkpoint.pth \\
        --output-dir out/linear_lobes --dataset-name brain_lobes --base-data-dir data/brain_lobes

Any config key can be set as ``key=value`` after the flags (e.g. ``optim.momentum=0.8``); the
defaults are in ``dinov2/configs/eval/linear_default.yaml`` and the dataset presets in
``dinov2/configs/datasets/``. Merge order: defaults <- preset <- ``--config-file`` <- flags <-
``key=value``; a key the defaults do not define is an error (docs/configuration.md lists them).

``--pretrained-weights none`` probes a randomly initialised backbone instead (the baseline a
pretrained one must beat); its architecture comes from ``--arch`` (``model.arch``) and
``model.backbone_kwargs.<key>=value``, as in segmentation finetuning, and is seeded by ``seed``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from dinov2.checkpoints.backbone_reader import load_pretrained_backbone
from dinov2.data.datalist import load_finetune_datalist, subset_training
from dinov2.data.preflight import PreflightCache, checked_finetune_datalist
from dinov2.eval.presets import add_dataset_arguments, dataset_flags, load_preset
from dinov2.layers.patch_embed import PatchGridError, to_3tuple
from dinov2.models.build import build_random_backbone, is_random_init
from dinov2.plot import plot_at_end
from dinov2.utils.config import load_config, load_yaml, packaged_config_path, save_config
from dinov2.utils.device import add_device_argument, resolve_device
from dinov2.utils.entry_point import add_debug_flag, entry_point, start_entry_point
from dinov2.utils.jsonsafe import json_safe
from dinov2.utils.tensorboard import TensorBoard

from .classifiers import GridResult, HeadRecord, ProbeGrid, best_head_logits, setup_grid, train_probe_grid
from .features import FeatureSet, load_or_extract_features
from .metrics import classification_metrics

logger = logging.getLogger("dinov2.eval.linear")

DEFAULT_CONFIG = "eval/linear_default"
# flag dest -> config key; None values are not given on the command line and keep the config's.
# The dataset flags are dinov2.eval.presets.DATASET_FLAG_KEYS, as in segmentation finetuning.
FLAG_KEYS = {
    "pretrained_weights": "pretrained_weights", "output_dir": "output_dir", "device": "device",
    "datalist": "dataset.datalist", "epochs": "optim.epochs", "epoch_length": "optim.epoch_length",
    "batch_size": "optim.batch_size", "learning_rates": "optim.learning_rates",
    "eval_period_iterations": "evaluation.eval_period_iterations", "num_workers": "features.num_workers",
    "arch": "model.arch", "seed": "seed", "tensorboard": "tensorboard",
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dinov2.eval.linear", description="Linear probing of a frozen 3D ViT backbone.",
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=None, help="YAML merged over the defaults and the preset")
    parser.add_argument("--pretrained-weights", default=None, help="backbone checkpoint (teacher_checkpoint.pth), or 'none' for a random-init "
                        "baseline of --arch")
    parser.add_argument("--arch", default=None, help="registry name of the random-init backbone (with "
                        "--pretrained-weights none), e.g. vit_large_3d; overrides with model.backbone_kwargs.<key>=value")
    parser.add_argument("--output-dir", default=None, help="where results.json and the feature cache go")
    add_dataset_arguments(parser, "backbone input, every volume resized to it")
    parser.add_argument("--datalist", default=None, help="classification datalist JSON (overrides the preset's)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--epoch-length", type=int, default=None, help="iterations per epoch")
    parser.add_argument("--batch-size", type=int, default=None, help="feature vectors per classifier step")
    parser.add_argument("--learning-rates", type=float, nargs="+", default=None)
    parser.add_argument("--eval-period-iterations", type=int, default=None,
                        help="validate every N iterations (evaluation.eval_period_iterations)")
    parser.add_argument("--num-workers", type=int, default=None, help="loader processes of the feature extraction")
    parser.add_argument("--seed", type=int, default=None, help="run seed: classifier initialisation and batch order")
    parser.add_argument("--tensorboard", action="store_true", default=None,
                        help="also write each head's training loss and validation accuracy to <output-dir>/tensorboard "
                             "(tensorboard; needs the tensorboard extra)")
    add_device_argument(parser)
    parser.add_argument("opts", nargs="*", default=[], help="key=value config overrides, applied last")
    add_debug_flag(parser)
    return parser


def build_config(args: argparse.Namespace) -> DictConfig:
    """defaults <- dataset preset <- --config-file <- flags <- key=value overrides.

    The preset is chosen by ``dataset.name`` wherever it was set (flag, file or override).

    Raises:
        ConfigError: an unknown key, named with its file or the command line and the closest known key.
        FileNotFoundError: the config file or the preset does not exist.
    """
    flags = {key: getattr(args, dest, None) for dest, key in FLAG_KEYS.items()}
    flags.update(dataset_flags(args))
    flags = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in flags.items()}
    # dataset.preprocessing is a partial override of the pretraining recipe's section: its keys are those.
    reference = load_yaml(packaged_config_path(DEFAULT_CONFIG))
    reference.dataset.preprocessing = load_yaml(packaged_config_path("data_defaults")).preprocessing
    return load_config(DEFAULT_CONFIG, args.config_file, flags, args.opts, preset_loader=load_preset,
                       reference=reference, open_keys=("model.backbone_kwargs",))


def _require(cfg: DictConfig, key: str, flag: str) -> Any:
    value = OmegaConf.select(cfg, key, throw_on_missing=False)
    if value is None or OmegaConf.is_missing(cfg, key):
        raise ValueError(f"No value for '{key}': pass {flag} (or set {key} in the config).")
    return value


def resolve_datalist(cfg: DictConfig) -> Path:
    """The datalist file: relative paths are read under ``dataset.base_data_dir`` when it is set."""
    datalist = Path(str(_require(cfg, "dataset.datalist", "--datalist or --dataset-name")))
    base = cfg.dataset.base_data_dir
    if not datalist.is_absolute() and base:
        datalist = Path(base) / datalist
    if not datalist.is_file():
        hint = ""
        if cfg.dataset.sample_command:
            hint = " Create it with: " + str(cfg.dataset.sample_command).replace("<base_data_dir>", str(base or "DIR"))
        raise FileNotFoundError(f"Classification datalist not found: {datalist}.{hint}")
    return datalist


def _stated_class_count(cfg: DictConfig) -> int | None:
    """The number of classes the config states (``dataset.num_classes``, else ``dataset.classes``), or None."""
    if cfg.dataset.num_classes is not None:
        return int(cfg.dataset.num_classes)
    return len(cfg.dataset.classes) if cfg.dataset.classes is not None else None


def _class_info(cfg: DictConfig, splits: dict[str, list[dict]], datalist: Path) -> tuple[int, list[str]]:
    """``(number of classes, class names)``; labels were checked by the pre-flight when the config states the classes."""
    labels = [e["label"] for entries in splits.values() for e in entries]
    bad = [v for v in labels if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise ValueError(f"{datalist}: labels must be class indices (int), found {bad[:3]}: this is not a "
                         "classification datalist.")
    num_classes = _stated_class_count(cfg) or max(labels) + 1
    if max(labels) >= num_classes:
        raise ValueError(f"{datalist}: label {max(labels)} found but dataset.num_classes is {num_classes}.")
    names = list(cfg.dataset.classes) if cfg.dataset.classes is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"dataset.classes has {len(names)} names for {num_classes} classes.")
    return num_classes, names


def _load_splits(cfg: DictConfig, output_dir: Path) -> tuple[Path, dict[str, list[dict]]]:
    """The datalist's splits: ``training`` subset to ``dataset.percent``, ``validation`` and ``test`` as listed.

    With ``dataset.validate``, the pre-flight (:mod:`dinov2.data.preflight`) checks every file
    first (``dataset.preflight``: every image read in full); ``dataset.skip_bad_inputs`` leaves bad
    entries out and lists them in ``<output_dir>/skipped.tsv``.

    Returns:
        ``(datalist_path, splits)``.

    Raises:
        ValueError: the datalist has no validation entries (they choose the classifier).
    """
    datalist_path = resolve_datalist(cfg)
    if cfg.dataset.validate:
        # channels None: a 4D file is accepted (the probe takes its first frame, with a warning)
        data = checked_finetune_datalist(datalist_path, channels=None, class_count=_stated_class_count(cfg),
                                         skip=bool(cfg.dataset.skip_bad_inputs), report_dir=output_dir,
                                         read_voxels=bool(cfg.dataset.preflight), cache=PreflightCache(),
                                         progress=False)
    else:
        data = load_finetune_datalist(datalist_path, validate=False, progress=False)
    splits = {
        "training": subset_training(data["training"], float(cfg.dataset.percent), int(cfg.dataset.seed)),
        "validation": data["validation"],
        "test": data["test"],
    }
    if not splits["validation"]:
        raise ValueError(f"{datalist_path} has no 'validation' entries; the probe needs them to choose its "
                         "classifier. Add a validation split to the datalist.")
    return datalist_path, splits


def _frozen_backbone(cfg: DictConfig, weights: str, image_size: tuple[int, int, int],
                     device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The backbone of :func:`_backbone` on ``device``, in eval mode and without gradients.

    Warns when ``image_size`` gives fewer than 2 tokens along a side.

    Raises:
        ValueError: ``image_size`` is not a multiple of the patch size.
    """
    model, backbone_info = _backbone(cfg, weights, image_size)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        grid = model.patch_embed.grid_size(image_size)
    except PatchGridError as exc:
        side = max(exc.patch_size)
        raise ValueError(f"--image-size {list(image_size)} is not a multiple of the backbone's patch size {side}: "
                         f"pass a multiple of {side}.") from exc
    if min(grid) < 2:
        # e.g. the brain_lobes preset's 16^3 patches under a patch-16 ViT-L: one token per patch,
        # so "patch tokens" and their average carry no spatial information.
        logger.warning("--image-size %s gives a %s token grid for patch size %s: the patch-token features are a "
                       "single token. Use --image-size %d or more for this backbone.", list(image_size), list(grid),
                       max(model.patch_embed.patch_size), 2 * max(model.patch_embed.patch_size))
    return model, backbone_info


def _split_features(cfg: DictConfig, model: torch.nn.Module, splits: dict[str, list[dict]], checkpoint: str | None,
                    image_size: tuple[int, int, int], output_dir: Path,
                    device: torch.device) -> tuple[list[int], dict[str, FeatureSet]]:
    """Features of every non-empty split, extracted once (or read from the feature cache).

    Args:
        checkpoint: the backbone's file, part of the cache key; None for a random-init backbone.

    Returns:
        ``(n_blocks, features)``: the sorted ``features.n_last_blocks``; per split a :class:`FeatureSet`
        with CLS tokens ``(N, max(n_blocks), E)`` and mean patch tokens ``(N, E)``.

    Raises:
        ValueError: ``features.n_last_blocks`` asks for more blocks than the backbone has.
    """
    n_blocks = sorted({int(n) for n in cfg.features.n_last_blocks})
    if n_blocks[-1] > model.depth:
        raise ValueError(f"features.n_last_blocks asks for {n_blocks[-1]} blocks; the backbone has {model.depth}.")
    preprocessing = OmegaConf.to_container(cfg.dataset.preprocessing, resolve=True)
    cache_dir = Path(str(cfg.features.cache_dir)) if cfg.features.cache_dir else output_dir / "features"
    features: dict[str, FeatureSet] = {}
    for split, entries in splits.items():
        if entries:
            features[split] = load_or_extract_features(
                model, entries, split=split, checkpoint=checkpoint, cache_dir=cache_dir, preprocessing=preprocessing,
                image_size=image_size, n_last_blocks=n_blocks[-1], batch_size=int(cfg.features.batch_size),
                num_workers=int(cfg.features.num_workers), device=device)
    return n_blocks, features


def log_evaluation(tb: TensorBoard, entry: dict) -> None:
    """An evaluation of the grid as TensorBoard scalars at step ``entry["iteration"]``.

    Tags: ``train_loss/<head>`` and ``val_accuracy/<head>`` per head (e.g.
    ``val_accuracy/blocks4_cls_avgpool_lr0.01``), ``train/loss`` (mean over the heads) and
    ``validation/best_accuracy`` (the best head's).
    """
    step = entry["iteration"]
    tb.scalar("train/loss", entry["train_loss"], step)
    tb.scalars(entry["train_loss_per_head"], step, group="train_loss")
    tb.scalars(entry["val_accuracy"], step, group="val_accuracy")
    tb.scalar("validation/best_accuracy", max(entry["val_accuracy"].values()), step)


def _train_heads(cfg: DictConfig, features: dict[str, FeatureSet], n_blocks: list[int], num_classes: int,
                 output_dir: Path) -> tuple[ProbeGrid, GridResult]:
    """Train the grid of linear heads on the training features, each validation written to ``metrics.jsonl``
    (and to ``tensorboard/`` with ``tensorboard: true``: :func:`log_evaluation`).

    Returns:
        ``(grid, result)``: the heads and each head's best validation record.
    """
    setups = setup_grid(n_blocks, list(cfg.features.pooling), [float(v) for v in cfg.optim.learning_rates])
    with torch.random.fork_rng():  # seeded head initialisation without touching the caller's RNG
        torch.manual_seed(int(cfg.seed))
        grid = ProbeGrid(setups, features["training"], num_classes)
    history_path = output_dir / "metrics.jsonl"
    history_path.unlink(missing_ok=True)

    # purge_step 0: the heads train from scratch each run, so a rerun hides the earlier run's events.
    with TensorBoard(output_dir, enabled=bool(cfg.tensorboard), setting="tensorboard (--tensorboard)",
                     purge_step=0) as tb:

        def log_eval(entry: dict) -> None:
            with open(history_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")
            log_evaluation(tb, entry)

        result = train_probe_grid(
            grid, features["training"], features["validation"], epochs=int(cfg.optim.epochs),
            epoch_length=cfg.optim.epoch_length, batch_size=int(cfg.optim.batch_size),
            eval_period_iterations=cfg.evaluation.eval_period_iterations, momentum=float(cfg.optim.momentum),
            weight_decay=float(cfg.optim.weight_decay), seed=int(cfg.seed), on_eval=log_eval)
    return grid, result


def _best_head_metrics(grid: ProbeGrid, best: HeadRecord, features: dict[str, FeatureSet], class_names: list[str],
                       datalist_path: Path) -> tuple[dict, dict | None]:
    """Metrics of the best head (restored to its best state) on validation, and on test when there is one.

    Returns:
        ``(val_metrics, test_metrics)``; ``test_metrics`` is None without test entries.
    """
    val_metrics = classification_metrics(best_head_logits(grid, best, features["validation"]),
                                         features["validation"].labels, class_names)
    test_metrics = None
    if "test" in features:
        logits = best_head_logits(grid, best, features["test"])
        test_metrics = classification_metrics(logits, features["test"].labels, class_names)
        test_metrics["cases"] = entry_predictions(logits, features["test"])
    else:
        logger.warning("%s has no 'test' entries: results.json reports validation metrics only.", datalist_path)
    return val_metrics, test_metrics


def entry_predictions(logits: torch.Tensor, features: FeatureSet) -> list[dict]:
    """One record per entry, so two backbones can be compared entry by entry (paired differences).

    Args:
        logits: ``(N, C)`` outputs of the chosen head.
        features: the split's features (labels ``(N,)`` and the ``N`` image paths).

    Returns:
        ``[{"name": image path(s), "label", "prediction", "correct"}]`` in the datalist's order.
    """
    predictions = logits.argmax(dim=1).tolist()
    labels = features.labels.tolist()
    return [{"name": "|".join(map(str, image)) if isinstance(image, (list, tuple)) else str(image),
             "label": int(label), "prediction": int(pred), "correct": int(label) == int(pred)}
            for image, label, pred in zip(features.images, labels, predictions)]


def _save_best_classifier(best: HeadRecord, num_classes: int, class_names: list[str], path: Path) -> None:
    """Write ``best_classifier.pth``: the best head's setup, classes and ``LinearProbe`` state at its best iteration."""
    torch.save({"setup": {"n_blocks": best.setup.n_blocks, "pooling": best.setup.pooling, "lr": best.setup.lr},
                "num_classes": num_classes, "class_names": class_names, "state_dict": best.state}, path)


def run(cfg: DictConfig) -> dict:
    """Run the whole evaluation described by a resolved config; returns what results.json holds."""
    output_dir = Path(str(_require(cfg, "output_dir", "--output-dir")))
    weights = str(_require(cfg, "pretrained_weights", "--pretrained-weights"))
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, output_dir)
    device = resolve_device(str(cfg.device), key="device")
    datalist_path, splits = _load_splits(cfg, output_dir)
    num_classes, class_names = _class_info(cfg, splits, datalist_path)
    size = cfg.dataset.image_size
    image_size = to_3tuple(OmegaConf.to_container(size) if OmegaConf.is_config(size) else size)
    model, backbone_info = _frozen_backbone(cfg, weights, image_size, device)
    checkpoint = None if backbone_info["random_init"] else weights
    n_blocks, features = _split_features(cfg, model, splits, checkpoint, image_size, output_dir, device)
    grid, result = _train_heads(cfg, features, n_blocks, num_classes, output_dir)
    best = result.best
    val_metrics, test_metrics = _best_head_metrics(grid, best, features, class_names, datalist_path)
    _save_best_classifier(best, num_classes, class_names, output_dir / "best_classifier.pth")
    results = {
        "best_classifier": {"name": best.setup.name, "n_blocks": best.setup.n_blocks, "pooling": best.setup.pooling,
                            "learning_rate": best.setup.lr, "iteration": best.iteration},
        "validation": val_metrics,
        "test": test_metrics,
        "chance_balanced_accuracy": 1.0 / num_classes,
        "grid": [{"name": r.setup.name, "n_blocks": r.setup.n_blocks, "pooling": r.setup.pooling,
                  "learning_rate": r.setup.lr, "best_val_accuracy": r.val_accuracy, "best_iteration": r.iteration}
                 for r in result.records.values()],
        "iterations": result.iterations,
        "dataset": {"datalist": str(datalist_path), "num_classes": num_classes, "class_names": class_names,
                    "sizes": {split: len(entries) for split, entries in splits.items()},
                    "percent": float(cfg.dataset.percent), "seed": int(cfg.dataset.seed)},
        "backbone": {**backbone_info, "embed_dim": model.embed_dim, "depth": model.depth,
                     "image_size": list(image_size)},
    }
    with open(output_dir / "results.json", "w", encoding="utf-8") as fh:
        json.dump(json_safe(results), fh, indent=2)
    summary = test_metrics or val_metrics
    logger.info("Best head %s (validation accuracy %.4f). %s: accuracy %.4f, balanced accuracy %.4f, macro AUROC %.4f. "
                "Results in %s", best.setup.name, best.val_accuracy, "Test" if test_metrics else "Validation",
                summary["accuracy"], summary["balanced_accuracy"], summary["auroc_macro"], output_dir / "results.json")
    plot_at_end(output_dir)
    return results


def _backbone(cfg: DictConfig, weights: str, image_size: tuple[int, int, int]) -> tuple[torch.nn.Module, dict]:
    """The backbone to probe and what results.json records of it (``random_init`` says which kind)."""
    if not is_random_init(weights):
        model, report = load_pretrained_backbone(weights, map_location="cpu")
        return model, {"path": weights, "random_init": False, "source_format": report.source_format,
                       "iteration": report.iteration}
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    # Built at the probe's input size, so the position embedding is used at its native grid.
    model, kwargs = build_random_backbone(model_cfg["arch"], model_cfg["backbone_kwargs"], image_size,
                                          flag="--arch (model.arch)", seed=int(cfg.seed))
    return model, {"path": "none", "random_init": True, "source_format": "random_init", "iteration": None,
                   "arch": kwargs.pop("arch"), "kwargs": {k: list(v) if isinstance(v, tuple) else v
                                                          for k, v in kwargs.items()},
                   "seed": int(cfg.seed)}


# Every ValueError of this command names a flag, config key or file to fix: one ERROR line.
@entry_point(user_errors=(ValueError,))
def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the process exit code (1 with one ``ERROR:`` line for a user error)."""
    args = get_args_parser().parse_args(argv)
    start_entry_point()
    cfg = build_config(args)
    run(cfg)
    return 0

