"""The command ``python -m dinov2.data.datalist``: build a datalist from folders, or validate one.

Command line::

    python -m dinov2.data.datalist pretrain /data/ct '/data/mri/**/*.nii.gz' -o pretrain.json --min-size 64
    python -m dinov2.data.datalist finetune --images imagesTr --labels labelsTr \\
        --split 0.7 0.15 0.15 --seed 0 --dataset-percent 25 -o btcv.json
    python -m dinov2.data.datalist finetune --images brats --labels brats --label-suffix _seg \\
        --modalities t1,t1ce,t2,flair -o brats.json
    python -m dinov2.data.datalist nnunet /data/nnUNet_raw/Dataset004_Hippocampus --fold 0
    python -m dinov2.data.datalist validate btcv.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

from dinov2.utils.entry_point import add_debug_flag, entry_point, start_entry_point
from dinov2.utils.errors import UsageError

from .build import DEFAULT_MODALITY_REGEX, build_finetune_datalist, build_pretrain_datalist
from .format import SPLITS, Skipped
from .load import load_datalist
from .nnunet import command as nnunet_command
from .write import write_datalist, write_skipped_report

logger = logging.getLogger("dinov2.data.datalist")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dinov2.data.datalist",
                                     description="Datalists: build them from folders, write them, and load them with validation.")
    sub = parser.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("pretrain", help="list NIfTI/DICOM volumes for self-supervised pretraining")
    pre.add_argument("inputs", nargs="+", help="folders (searched recursively), files or quoted globs ('**' recurses)")
    pre.add_argument("-o", "--output", required=True, help="datalist JSON to write")
    pre.add_argument(
        "--min-size", type=int, nargs="+", default=[1], metavar="N", help="minimum voxels per axis (one value or 3)"
    )
    pre.add_argument("--relative", action="store_true", help="write paths relative to the datalist's folder")
    # Default 1: on a busy 2-core machine 2 spawned workers were slower (17 s vs 7.6 s, 10k files).
    pre.add_argument("--workers", type=int, default=1, help="header-reading processes, for many-core machines")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")

    fin = sub.add_parser("finetune", help="pair images with labels by name and split them")
    fin.add_argument("--images", required=True, help="folder of images (NIfTI files or DICOM series subfolders)")
    labels = fin.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help="folder of label NIfTI files (may equal --images)")
    labels.add_argument("--label-csv", help="CSV with columns name,label (class index) for classification")
    fin.add_argument("--label-suffix", default="", help="label file name = case name + this (e.g. _seg)")
    fin.add_argument(
        "--modalities", help="comma-separated modality suffixes, e.g. t1,flair: case1_t1.nii.gz + case1_flair.nii.gz"
    )
    fin.add_argument(
        "--modality-regex", default=DEFAULT_MODALITY_REGEX, help="regex with groups 'case', 'modality' on image names"
    )
    fin.add_argument("--split", type=float, nargs=3, default=[0.7, 0.15, 0.15], metavar=("TRAIN", "VAL", "TEST"))
    fin.add_argument("--seed", type=int, default=0)
    fin.add_argument(
        "--dataset-percent", type=float, default=100.0, help="keep this %% of the training cases (nested, seeded)"
    )
    fin.add_argument("-o", "--output", required=True)
    fin.add_argument("--relative", action="store_true", help="write paths relative to the datalist's folder")
    fin.add_argument("--no-progress", action="store_true")

    nnunet_command.add_parser(sub)

    val = sub.add_parser("validate", help="check every entry of an existing datalist")
    val.add_argument("datalist")
    val.add_argument("--no-progress", action="store_true")
    for any_parser in (parser, pre, fin, val, sub.choices["nnunet"]):  # before or after the subcommand
        add_debug_flag(any_parser)
    return parser


def _skip_note(skipped: Sequence[Skipped], report: Path | None) -> str:
    return f"; {len(skipped)} skipped, listed in {report}" if report else ""


# Every ValueError of building or reading a datalist is about the folders, files or flags given.
@entry_point(user_errors=(ValueError,))
def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code: 1, with one ``ERROR:`` line, for
    a datalist error, a missing file or a bad flag value; 1 also when a build skipped a file (the
    datalist of the others is written, and ``<datalist>.skipped.tsv`` lists each skipped file
    and why), so a batch script notices; 0 when every file was used."""
    args = _parser().parse_args(argv)
    start_entry_point(tune_allocator=False)
    if args.command == "pretrain":
        entries, skipped = build_pretrain_datalist(
            args.inputs, min_size=args.min_size, progress=not args.no_progress, workers=args.workers
        )
        if not entries:
            raise UsageError(f"No usable volume found in {' '.join(args.inputs)} (the warnings above say why each "
                             "file was skipped); nothing written. Give folders or globs of NIfTI files or DICOM series.")
        out = write_datalist(entries, args.output, relative=args.relative)
        report = write_skipped_report(skipped, out)
        print(f"Wrote {len(entries)} volumes to {out}" + _skip_note(skipped, report))
        return 1 if skipped else 0
    elif args.command == "finetune":
        modalities = [m.strip() for m in args.modalities.split(",") if m.strip()] if args.modalities else None
        datalist, skipped = build_finetune_datalist(
            args.images, args.labels, args.label_csv, args.label_suffix, modalities, args.modality_regex,
            args.split, args.seed, args.dataset_percent, progress=not args.no_progress,
        )
        if not datalist["training"]:
            raise UsageError(f"No training case left in {args.images} (the warnings above say why cases were "
                             "skipped); nothing written. Check --labels / --label-suffix / --split.")
        out = write_datalist(datalist, args.output, relative=args.relative)
        report = write_skipped_report(skipped, out)
        print(f"Wrote {out}: " + ", ".join(f"{len(datalist[s])} {s}" for s in SPLITS) + _skip_note(skipped, report))
        return 1 if skipped else 0
    elif args.command == "nnunet":
        return nnunet_command.run(args)
    else:
        data = load_datalist(args.datalist, validate=True, progress=not args.no_progress)
        count = len(data) if isinstance(data, list) else sum(len(data[s]) for s in SPLITS)
        print(f"{args.datalist}: all {count} entries are valid")
    return 0
