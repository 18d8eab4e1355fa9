"""``python -m dinov2.eval.linear``: linear probing of a frozen backbone (see :mod:`.run`)."""

import sys

from dinov2.eval.linear.run import main

if __name__ == "__main__":
    sys.exit(main())
