"""``python -m dinov2.data.datalist``: build or validate a datalist (see :mod:`.cli`)."""

import sys

from dinov2.data.datalist.cli import main

if __name__ == "__main__":
    sys.exit(main())
