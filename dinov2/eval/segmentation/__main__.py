"""``python -m dinov2.eval.segmentation``: finetune a pretrained backbone for segmentation (see :mod:`.finetune`)."""

import sys

from dinov2.eval.segmentation.finetune import main

if __name__ == "__main__":
    sys.exit(main())
