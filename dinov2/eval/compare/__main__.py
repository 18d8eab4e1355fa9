"""``python -m dinov2.eval.compare``: the same evaluation for several backbones, one table (see :mod:`.cli`)."""

import sys

from dinov2.eval.compare.cli import main

if __name__ == "__main__":
    sys.exit(main())
