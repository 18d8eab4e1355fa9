"""``python -m dinov2.data.datalist nnunet DATASET_DIR``: an nnU-Net raw dataset -> datalist + preset.

Everything is checked (and the preset validated) before the first file is written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from dinov2.utils.errors import UsageError

from ..format import SPLITS
from ..write import write_datalist
from .dataset import SPLITS_FILE, nnunet_datalist, read_nnunet_dataset
from .preset import build_preset, preset_yaml, write_preset

logger = logging.getLogger(__name__)

DEFAULT_SPLIT = (0.8, 0.2)


def _splits_path(root: Path, splits_file: str | None, split: Sequence[float] | None) -> Path | None:
    """The ``splits_final.json`` to use: ``--splits``, else the dataset folder's, else None (seeded split)."""
    path = Path(splits_file) if splits_file else root / SPLITS_FILE
    if splits_file and not path.is_file():
        raise UsageError(f"--splits {path}: file not found.")
    if not path.is_file():
        return None
    if split is not None:
        raise UsageError(f"--split and {path} both give a split: drop --split to use the file's --fold, or move "
                         "the file away to split by fractions.")
    return path


def _check_numbers(split: Sequence[float] | None, stats_cases: int) -> None:
    """``--split`` is two non-negative fractions summing to 1; ``--stats-cases`` at least 1."""
    if split is not None and (len(split) != 2 or min(split) < 0 or abs(sum(split) - 1) > 1e-6):
        raise UsageError(f"--split takes two non-negative fractions summing to 1 (train, validation), got {list(split)}.")
    if stats_cases < 1:
        raise UsageError(f"--stats-cases must be at least 1, got {stats_cases}.")


def _validated(preset: dict[str, Any]) -> None:
    """The preset passes the same checks as one given to ``--dataset-name`` (before anything is written)."""
    from dinov2.eval.presets import DatasetPreset  # noqa: PLC0415 - the preset's own checks live with the evaluation

    DatasetPreset.from_config(preset)


def _header(root: Path, out: Path, preset_path: Path) -> list[str]:
    return [f"Dataset preset of the nnU-Net raw dataset {root}",
            f"(python -m dinov2.data.datalist nnunet); its datalist is {out}. Finetune with:",
            f"python -m dinov2.eval.segmentation --dataset-name {preset_path} --base-data-dir {out.parent} \\",
            "    --pretrained-weights TEACHER.pth --output-dir runs/seg"]


def import_nnunet(dataset_dir: str | Path, output: str | Path | None = None, preset_out: str | Path | None = None,
                  fold: int = 0, split: Sequence[float] | None = None, seed: int = 0, splits_file: str | None = None,
                  relative: bool = False, stats_cases: int = 50, progress: bool = True) -> tuple[Path, Path, dict]:
    """Check an nnU-Net raw dataset and write its finetuning datalist and dataset preset.

    Args:
        dataset_dir: the ``DatasetXXX_Name`` folder.
        output: datalist JSON (default ``DATASET_DIR/datalist.json``, ``datalist_fold<K>.json`` with a splits file).
        preset_out: preset YAML (default ``<output stem>_preset.yaml`` beside the datalist).
        fold: fold of ``splits_final.json`` (``splits_file``, else the dataset folder's) when there is one.
        split: ``(train, validation)`` fractions without a splits file (default 0.8 0.2).
        seed: seed of that split and of the CT statistics' case sample.
        splits_file: an nnU-Net ``splits_final.json`` (nnU-Net_preprocessed/DatasetXXX_Name/).
        relative: datalist paths relative to its folder.
        stats_cases: training cases sampled for CT intensity statistics.
        progress: progress bars while reading label maps.

    Returns:
        ``(datalist path, preset path, datalist)``.

    Raises:
        DatalistError: every inconsistency of the dataset at once; nothing is written.
        UsageError: conflicting split options, or no validation case.
    """
    root = Path(dataset_dir).absolute()
    _check_numbers(split, stats_cases)
    splits_path = _splits_path(root, splits_file, split)
    dataset = read_nnunet_dataset(root, progress)
    datalist = nnunet_datalist(dataset, splits_path, fold, split or DEFAULT_SPLIT, seed)
    if not datalist["training"] or not datalist["validation"]:
        raise UsageError(f"{len(dataset.training)} training case(s) give {len(datalist['training'])} training and "
                         f"{len(datalist['validation'])} validation case(s); finetuning needs both. Change --split.")
    out = Path(output) if output else root / ("datalist.json" if splits_path is None else f"datalist_fold{fold}.json")
    preset_path = Path(preset_out) if preset_out else out.with_name(f"{out.stem}_preset.yaml")
    preset, comments = build_preset(dataset, out.name, stats_cases, seed)
    _validated(preset)
    text = preset_yaml(preset, comments, _header(root, out.absolute(), preset_path.absolute()))
    written = write_datalist(datalist, out, relative=relative)
    return written, write_preset(text, preset_path), datalist


def run(args) -> int:
    """The ``nnunet`` subcommand of :mod:`..cli`: prints what was written; exit code 0."""
    out, preset, datalist = import_nnunet(args.dataset_dir, args.output, args.preset_out, args.fold, args.split,
                                          args.seed, args.splits, args.relative, args.stats_cases,
                                          progress=not args.no_progress)
    counts = ", ".join(f"{len(datalist[s])} {s}" for s in SPLITS)
    print(f"Wrote {out} ({counts}) and the preset {preset}")
    return 0


def add_parser(sub) -> None:
    """Register the ``nnunet`` subcommand on the ``add_subparsers`` object ``sub``."""
    p = sub.add_parser("nnunet", help="import an nnU-Net raw dataset (DatasetXXX_Name): datalist + dataset preset")
    p.add_argument("dataset_dir", help="the DatasetXXX_Name folder (dataset.json, imagesTr, labelsTr, imagesTs)")
    p.add_argument("-o", "--output", help="datalist JSON (default DATASET_DIR/datalist.json, or "
                   "datalist_fold<K>.json with a splits_final.json)")
    p.add_argument("--preset-out", help="dataset preset YAML (default <datalist stem>_preset.yaml beside it)")
    p.add_argument("--fold", type=int, default=0, help="fold of splits_final.json, when there is one (default 0)")
    p.add_argument("--splits", help="nnU-Net's splits_final.json (default: DATASET_DIR/splits_final.json if present)")
    p.add_argument("--split", type=float, nargs=2, default=None, metavar=("TRAIN", "VAL"),
                   help="seeded train/validation fractions without a splits file (default 0.8 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of --split and of the CT statistics' case sample")
    p.add_argument("--stats-cases", type=int, default=50, help="training cases sampled for CT intensity statistics")
    p.add_argument("--relative", action="store_true", help="write paths relative to the datalist's folder")
    p.add_argument("--no-progress", action="store_true")
