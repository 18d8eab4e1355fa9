"""Export a finetuned segmenter or a pretrained backbone for deployment.

Usage::

    python -m dinov2.export --checkpoint seg_out/best_model.pth --format onnx --output model.onnx
    python -m dinov2.export --checkpoint eval/training_9999/teacher_checkpoint.pth --format onnx --output vit.onnx

The checkpoint decides what is exported. A finetuned segmenter (best_model.pth) maps
image (B, C, H, W, D) to logits (B, K, H, W, D); its preprocessing (orientation, spacing,
intensity, window, modalities, classes or regions, sliding-window settings) is stored in the
file, so python -m dinov2.eval.segmentation.predict --model model.onnx needs nothing else. A
backbone (teacher checkpoint) maps image (B, C, H, W, D) to cls_token (B, E) and
patch_tokens (B, N, E), both after the final norm.

Input sizes: the batch B is free for every model. H, W, D are free (multiples of the patch
size) for backbones and the UNETR, Linear and UNetFusion heads, and for the DPT head
(multiples of lcm(32, patch)); the ViTAdapterUNETR and DinoUNet heads are exported for their
training window only (the adapter's deformable attention fixes its feature-pyramid sizes),
which is what sliding-window prediction feeds them. Every
export is run with ONNX Runtime and compared with PyTorch at a second batch (and spatial) size
before the file is written; a model that cannot be exported faithfully fails with one line and
leaves no file. Needs the export extra: pip install 'dinov2-3d[export]'.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from dinov2.utils.entry_point import add_debug_flag, entry_point, start_entry_point

logger = logging.getLogger("dinov2.export")

FORMATS = ("onnx",)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dinov2.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="best_model.pth of python -m dinov2.eval.segmentation, or a teacher_checkpoint.pth")
    p.add_argument("--format", required=True, choices=FORMATS, help="export format")
    p.add_argument("--output", required=True, help="file to write (.onnx); its folder is created if missing")
    add_debug_flag(p)
    return p


# Every ValueError of loading is about the checkpoint given (its config or preset): one ERROR line.
@entry_point(user_errors=(ValueError,))
def main(argv: Sequence[str] | None = None) -> int:
    """Export ``--checkpoint``; returns 0, or 1 after one ``ERROR:`` line (a missing or unreadable
    checkpoint, an unknown --format, an output folder that cannot be written, a model that cannot be
    exported, or the export extra missing)."""
    args = get_args_parser().parse_args(argv)
    start_entry_point()
    from dinov2.export.onnx_export import export_checkpoint  # noqa: PLC0415 - keeps --help fast

    written, _ = export_checkpoint(args.checkpoint, args.output)
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
