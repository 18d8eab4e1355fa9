"""``python -m dinov2.sample_data``: write the sample pretraining datalist and segmentation set(s) (see :mod:`.cli`)."""

import sys

from dinov2.sample_data.cli import main

if __name__ == "__main__":
    sys.exit(main())
