"""The baseline instance segmentation: threshold the raw intensities, label the connected components.

No model: a voxel is foreground when its intensity exceeds a threshold (Otsu's by default,
computed on each stack), and each connected region of foreground is one object. The raw
intensities are used as they are unless ``--smooth SIGMA`` asks for a Gaussian filter first (in
voxels), which keeps noise from breaking the foreground into speckles. Objects that
touch, or are joined by a bridge of bright voxels, become ONE object; that is the failure the
distance-map method (a valley between touching objects, then a seeded watershed) is there to fix,
and what comparing the two measures.

Connectivity: ``26`` (default) joins voxels that share a face, an edge or a corner; ``6`` joins
face neighbours only, so objects touching at an edge or a corner stay apart (and thin diagonal
structures break up).

Command line::

    python -m dinov2.eval.instances baseline IMAGE_OR_FOLDER --output DIR [--threshold T]
        [--min-size N] [--connectivity 26|6] [--smooth SIGMA] [--spacing X Y Z] [--no-preview]

writes ``DIR/<stem>_instances.<ext>`` per stack, in the input's format and space (TIFF or NIfTI), and
its preview ``DIR/<stem>_instances.png``, as ``segment`` does.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from dinov2.utils.entry_point import add_debug_flag, entry_point, start_entry_point
from dinov2.utils.errors import UsageError

from .io import list_stacks, output_name, read_image, stack_stem, write_labels
from .postprocess import INSTALL_HINT, relabel_by_size
from .preview import write_preview

logger = logging.getLogger("dinov2.eval.instances.baseline")

CONNECTIVITY = {6: 1, 26: 3}  # neighbourhood -> rank of scipy's structuring element


def otsu_threshold(image: np.ndarray) -> float:
    """Otsu's threshold of ``image`` (any shape), from scikit-image (the optional extra ``instances``)."""
    try:
        from skimage.filters import threshold_otsu
    except ImportError as error:
        raise ImportError(f"the baseline's Otsu threshold needs scikit-image, which is not installed: "
                          f"{INSTALL_HINT}") from error
    return float(threshold_otsu(np.asarray(image, dtype=np.float32)))


def foreground_threshold(image: np.ndarray, threshold: float | None = None) -> float:
    """``threshold``, or when None Otsu's threshold of ``image`` (its maximum for a constant image:
    no foreground, as Otsu needs two grey levels)."""
    if threshold is not None:
        return float(threshold)
    return otsu_threshold(image) if np.ptp(image) > 0 else float(np.max(image))


def threshold_components(image: np.ndarray, threshold: float | None = None, min_voxels: int = 0,
                         connectivity: int = 26, smooth: float = 0.0) -> np.ndarray:
    """Instance labels of the connected components of ``image > threshold``.

    Args:
        image: ``(X, Y, Z)`` raw intensities.
        threshold: foreground is strictly above it; None: Otsu's threshold of ``image`` (of the
            smoothed image when ``smooth`` > 0).
        min_voxels: components with fewer voxels become background.
        connectivity: ``26`` (faces, edges and corners) or ``6`` (faces only).
        smooth: sigma of a Gaussian filter applied first, in voxels (0: none).

    Returns:
        ``(X, Y, Z)`` int32 labels, 0 = background, objects numbered 1..n.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be (X, Y, Z), got shape {image.shape}")
    if connectivity not in CONNECTIVITY:
        raise ValueError(f"connectivity must be 6 or 26, got {connectivity}")
    if smooth < 0:
        raise ValueError(f"smooth must be >= 0, got {smooth}")
    if smooth > 0:
        image = ndi.gaussian_filter(image.astype(np.float32), float(smooth))
    threshold = foreground_threshold(image, threshold)
    structure = ndi.generate_binary_structure(3, CONNECTIVITY[connectivity])
    components, _ = ndi.label(image > threshold, structure=structure)
    return relabel_by_size(components, min_voxels)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dinov2.eval.instances baseline",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="a TIFF / NIfTI stack, or a folder of them")
    parser.add_argument("--output", required=True, help="folder for <stem>_instances.<ext> and .png (created)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="foreground is above it, in the stack's intensity units (default: Otsu's, per stack)")
    parser.add_argument("--min-size", type=int, default=0, help="remove objects of fewer voxels (default 0)")
    parser.add_argument("--connectivity", type=int, choices=sorted(CONNECTIVITY), default=26,
                        help="26: faces, edges and corners join voxels (default); 6: faces only")
    parser.add_argument("--smooth", type=float, default=0.0,
                        help="sigma (voxels) of a Gaussian filter before thresholding (default 0: raw intensities)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), default=None,
                        help="voxel size of every input, instead of what the files state (written to the output)")
    parser.add_argument("--no-preview", action="store_true", help="do not write <stem>_instances.png")
    add_debug_flag(parser)
    return parser


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """``baseline``: threshold + connected components of every input stack; prints one line per stack."""
    args = _parser().parse_args(argv)
    start_entry_point(tune_allocator=False)
    if args.min_size < 0 or args.smooth < 0:
        raise UsageError(f"--min-size and --smooth must be >= 0, got {args.min_size} and {args.smooth}")
    inputs = list_stacks(args.input)
    output = Path(args.output)
    for path in inputs:
        stack = read_image(path, spacing=args.spacing)
        image = ndi.gaussian_filter(stack.array, args.smooth) if args.smooth > 0 else stack.array
        threshold = foreground_threshold(image, args.threshold)
        labels = threshold_components(image, threshold, args.min_size, args.connectivity)
        written = write_labels(output / output_name(path), labels, stack)
        if not args.no_preview:
            write_preview(output / (stack_stem(written) + ".png"), stack.array, labels, stack.spacing)
        print(f"{path.name}: {int(labels.max())} objects (threshold {threshold:.6g}) -> {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
