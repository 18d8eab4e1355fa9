"""``python -m dinov2.eval.visualisation``: PCA / attention views of a frozen backbone (see :mod:`.run`)."""

import sys

from dinov2.eval.visualisation.run import main

if __name__ == "__main__":
    sys.exit(main())
