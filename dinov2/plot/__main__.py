"""``python -m dinov2.plot RUN_DIR``: a run's curves as PNG files (see :mod:`dinov2.plot`)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from dinov2.utils.entry_point import add_debug_flag, entry_point, start_entry_point

from . import __doc__ as PACKAGE_DOC
from .run import plot_run


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Write the PNGs and print their paths; one ``ERROR:`` line and exit code 1 for a user error
    (a ``PlotError`` or a missing file)."""
    parser = argparse.ArgumentParser(prog="python -m dinov2.plot", description=PACKAGE_DOC.split("\n\n")[0],
                                     epilog=PACKAGE_DOC.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="the --output-dir of a pretraining, segmentation or linear-probe run")
    parser.add_argument("--out", default=None, help="where the PNGs go (default: RUN_DIR/plots)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    start_entry_point(tune_allocator=False)
    written = plot_run(args.run_dir, args.out)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
