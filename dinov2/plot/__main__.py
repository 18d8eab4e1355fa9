"""``python -m dinov2.plot RUN_DIR``: a run's curves as PNG files (see :mod:`dinov2.plot`)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import __doc__ as PACKAGE_DOC
from .errors import PlotError
from .run import plot_run


def main(argv: Sequence[str] | None = None) -> int:
    """Write the PNGs and print their paths; one ``ERROR:`` line and exit code 1 for a user error."""
    parser = argparse.ArgumentParser(prog="python -m dinov2.plot", description=PACKAGE_DOC.split("\n\n")[0],
                                     epilog=PACKAGE_DOC.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="the --output-dir of a pretraining, segmentation or linear-probe run")
    parser.add_argument("--out", default=None, help="where the PNGs go (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        written = plot_run(args.run_dir, args.out)
    except PlotError as exc:
        print("ERROR: " + " ".join(str(exc).split()), file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
