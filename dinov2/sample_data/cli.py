"""Write the sample pretraining datalist and segmentation set(s) from brain volumes of installed packages.

Command line::

    python -m dinov2.sample_data --out demo_data [--labels tissue|harvard_oxford|both] [--hold-out-evaluation]

The brain-lobe classification sample has its own command, ``python -m
dinov2.sample_data.classification --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

from dinov2.utils.entry_point import add_debug_flag, entry_point, start_entry_point

from .pretraining import write_pretraining_datalist
from .segmentation import LABEL_SETS, write_segmentation_dataset


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Write the sample pretraining datalist and segmentation set(s); print where they are."""
    parser = argparse.ArgumentParser(prog="python -m dinov2.sample_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--labels", choices=LABEL_SETS + ("both",), default="both", help="segmentation label set(s) to write"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the case variations")
    parser.add_argument("--hold-out-evaluation", action="store_true",
                        help="pretraining datalist without the FSL MNI152 templates the evidence evaluates on, "
                             "nor 4D series (what configs/small_cpu.yaml pretrains on)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    start_entry_point(logging.WARNING, tune_allocator=False)
    out = Path(args.out)
    pretrain = write_pretraining_datalist(out / "pretrain_datalist.json", args.hold_out_evaluation)
    n_volumes = len(json.loads(pretrain.read_text()))
    print(f"pretraining datalist ({n_volumes} volumes): {pretrain}")
    for labels in (LABEL_SETS if args.labels == "both" else (args.labels,)):
        path = write_segmentation_dataset(out, labels=labels, seed=args.seed)
        print(f"segmentation datalist ({labels}): {path}")
    return 0
