"""``python -m dinov2.eval.evidence``: print and write whether a teacher's frozen features learned anything.

The probes' penalties are chosen by cross-validation over folds of cubic blocks that each hold
every lobe (``--cv-grouping blocks --cv-block-mm 48``); ``--cv-grouping z-slabs`` gives the former
z-slab folds and their numbers; ``--cv-buffer`` keeps each fold's fits off its voxels.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from dinov2.utils.device import add_device_argument
from dinov2.utils.entry_point import add_debug_flag, entry_point, start_entry_point

from . import __doc__ as PACKAGE_DOC
from .folds import DEFAULT_BLOCK_MM, DEFAULT_BUFFER, DEFAULT_FOLDS, DEFAULT_GROUPING, GROUPINGS
from .report import format_table
from .run import DEFAULT_BATCH_SIZE, DEFAULT_BLOCKS, DEFAULT_DENSE_WINDOW, DEFAULT_PATCH_SIZE, run_evidence


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dinov2.eval.evidence", description=PACKAGE_DOC.split("\n\n")[0],
                                     epilog=PACKAGE_DOC.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, nargs="+", help="teacher checkpoint(s); several = several seeds")
    parser.add_argument("--output-dir", default=None, help="where evidence.json / evidence.md go "
                        "(default: <first teacher's folder>/evidence)")
    parser.add_argument("--random-seeds", type=int, default=3, help="random-init backbones compared (seeds 0..n-1)")
    parser.add_argument("--dense-window", type=int, default=DEFAULT_DENSE_WINDOW,
                        help="dense-task window side in voxels; a multiple of the backbone's patch size")
    parser.add_argument("--patch-size", type=int, default=DEFAULT_PATCH_SIZE,
                        help="patch-task input cube side in voxels, centred on each site (16 = the sites' own "
                             "32 mm patches; larger adds context, other hemisphere blanked); a multiple of the "
                             "backbone's patch size, at least 16")
    parser.add_argument("--cv-folds", type=int, default=DEFAULT_FOLDS,
                        help="cross-validation folds of the training hemisphere that choose each probe's L2 penalty "
                             "and the raw baseline's pooling")
    parser.add_argument("--cv-grouping", choices=GROUPINGS, default=DEFAULT_GROUPING,
                        help="blocks: folds of whole cubic blocks of item centres, dealt so that each holds "
                             "every lobe; z-slabs: the former contiguous z slabs (reproduces earlier numbers)")
    parser.add_argument("--cv-block-mm", type=float, default=DEFAULT_BLOCK_MM,
                        help="side in mm of the cubic blocks of item centres (--cv-grouping blocks)")
    parser.add_argument("--cv-buffer", action=argparse.BooleanOptionalAction, default=DEFAULT_BUFFER,
                        help="fit each fold's probes without the items whose input shares a voxel with the held-out "
                             "fold (off by default: the CV then measures extrapolation across the brain, which the "
                             "mirrored test hemisphere does not ask for)")
    parser.add_argument("--last-blocks", type=int, nargs="+", default=list(DEFAULT_BLOCKS),
                        help="read each network's features from its last N blocks (concatenated), one row per N "
                             "(default: 1 and 4, as DINOv2's linear evaluation; capped at the depth)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="patches per forward pass")
    add_device_argument(parser, default="cpu", key=None)
    add_debug_flag(parser)
    return parser


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit code (1 with one ``ERROR:`` line for a user error:
    an ``EvidenceError``, ``SampleDataError`` or missing file, see :func:`~dinov2.utils.entry_point.entry_point`)."""
    args = get_args_parser().parse_args(argv)
    start_entry_point()
    evidence = run_evidence(args.teacher, args.random_seeds, args.output_dir, args.device, args.dense_window,
                            args.batch_size, patch_size=args.patch_size, cv_folds=args.cv_folds,
                            blocks=args.last_blocks, cv_grouping=args.cv_grouping, cv_block_mm=args.cv_block_mm,
                            cv_buffer=args.cv_buffer)
    print(format_table(evidence))
    print(f"Wrote {evidence['files']['json']} and {evidence['files']['markdown']} ({evidence['seconds']} s).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
