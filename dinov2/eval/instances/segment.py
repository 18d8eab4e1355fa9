"""Segment image stacks into object instances with a trained distance model.

Usage::

    python -m dinov2.eval.instances segment cells.tif --checkpoint runs/nuclei/best_model.pth --output seg
    python -m dinov2.eval.instances segment stacks/ --checkpoint best_model.pth --output seg --cells-max 0.6

The input is a TIFF or NIfTI stack, or a folder of them (TIFF and NIfTI may be mixed). For each
stack: the distance map is predicted by sliding windows with the checkpoint's preprocessing
(:func:`.model.stack_distance`), split by the seeded watershed with the checkpoint's thresholds
(``--cells-max`` / ``--cell-fill`` override them) and written as uint16 instance labels in the
input's format and space (:func:`.io.write_labels`: a TIFF keeps its spacing, a NIfTI its affine),
``<stem>_instances.<ext>``, next to a preview ``<stem>_instances.png`` (three mid-planes, one
colour per object) and, with ``--save-distance``, the float32 distance map
``<stem>_distance.<ext>``.

A stack that cannot be read or segmented gets one line naming the file and the reason, the others
are still segmented, ``skipped.tsv`` lists the failures, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dinov2.eval.segmentation.predict import skip_reason, write_skipped
from dinov2.utils.device import add_device_argument, resolve_device
from dinov2.utils.entry_point import add_debug_flag, entry_point, start_entry_point
from dinov2.utils.errors import UsageError, explain_resource_error
from dinov2.utils.precision import PRECISIONS, autocast_context

from .data import Preprocessing
from .io import list_stacks, output_name, read_image, stack_stem, write_labels, write_stack
from .model import load_distance_model, stack_distance
from .postprocess import instances_from_distance
from .preview import write_preview

logger = logging.getLogger("dinov2.eval.instances.segment")


def get_args_parser() -> argparse.ArgumentParser:
    """The ``segment`` command line."""
    p = argparse.ArgumentParser(prog="python -m dinov2.eval.instances segment", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="a TIFF / NIfTI stack, or a folder of them")
    p.add_argument("--checkpoint", required=True, help="best_model.pth of python -m dinov2.eval.instances train")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--cells-max", type=float, help="peak threshold of the watershed markers (default: the stored one)")
    p.add_argument("--cell-fill", type=float, help="foreground threshold of the watershed (default: the stored one)")
    p.add_argument("--min-size", type=int, help="remove objects of fewer voxels (default: postprocess.min_voxels)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="voxel size of every input stack, over what the files state")
    p.add_argument("--save-distance", action="store_true", help="also write <stem>_distance.<ext>, the float map")
    p.add_argument("--no-preview", action="store_true", help="do not write <stem>_instances.png")
    add_device_argument(p, default="auto", key=None)
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="autocast of the forward passes")
    add_debug_flag(p)
    return p


def thresholds_of(args: argparse.Namespace, stored: dict) -> tuple[float, float]:
    """``(cells_max, cell_fill)``: the flags over the checkpoint's thresholds.

    Raises:
        UsageError: ``cell_fill`` not below ``cells_max``.
    """
    cells_max = args.cells_max if args.cells_max is not None else float(stored["cells_max"])
    cell_fill = args.cell_fill if args.cell_fill is not None else float(stored["cell_fill"])
    if not cell_fill < cells_max:
        raise UsageError(f"--cell-fill ({cell_fill}) must be below --cells-max ({cells_max}); the checkpoint stores "
                         f"cells_max {stored['cells_max']}, cell_fill {stored['cell_fill']}")
    return cells_max, cell_fill



def segment_stack(path: Path, model, info: dict, args: argparse.Namespace, device, settings: dict) -> Path:
    """Segment one stack and write its outputs; returns the label file written."""
    cfg = info["config"]
    stack = read_image(path, spacing=args.spacing)
    distance = stack_distance(model, stack, Preprocessing.from_config(cfg["dataset"]),
                              float(cfg["evaluation"]["overlap"]), int(cfg["evaluation"]["sw_batch_size"]),
                              autocast_context(args.precision, device), device)
    labels = instances_from_distance(distance, settings["cells_max"], settings["cell_fill"],
                                     min_voxels=settings["min_voxels"])
    out_dir = Path(args.output)
    written = write_labels(out_dir / output_name(path), labels, like=stack)
    if not args.no_preview:
        write_preview(out_dir / f"{stack_stem(path)}_instances.png", stack.array, labels, spacing=stack.spacing)
    if args.save_distance:
        write_stack(out_dir / output_name(path, "_distance"), distance.astype(np.float32), stack)
    return written


# A wrong path, flag value or checkpoint is the user's to fix: one ERROR line and exit code 1.
@entry_point(user_errors=(ValueError,))
def main(argv: Sequence[str] | None = None) -> int:
    """Segment every stack of the input; returns the exit code (1 when a stack failed, or after one
    ``ERROR:`` line for a user error: a missing input, a bad flag value or checkpoint)."""
    args = get_args_parser().parse_args(argv)
    start_entry_point()
    if args.min_size is not None and args.min_size < 0:
        raise UsageError(f"--min-size must be >= 0, got {args.min_size}")
    stacks = list_stacks(args.input)
    device = resolve_device(args.device, key="--device")
    model, info = load_distance_model(args.checkpoint, device)
    cells_max, cell_fill = thresholds_of(args, info["thresholds"])
    min_voxels = args.min_size if args.min_size is not None else int(info["config"]["postprocess"]["min_voxels"])
    settings = {"cells_max": cells_max, "cell_fill": cell_fill, "min_voxels": min_voxels}
    logger.info("%s head (iteration %d) on %d stack(s); cells_max %.2f, cell_fill %.2f, min size %d voxels",
                info["head"], info["iteration"], len(stacks), cells_max, cell_fill, min_voxels)
    skipped: list[tuple[str, str]] = []
    # A bar over the stacks gives rate and ETA on stderr; the written paths go to stdout.
    with logging_redirect_tqdm(), tqdm(stacks, desc="segment", unit="stack", dynamic_ncols=True) as bar:
        for path in bar:
            bar.set_postfix_str(path.name)
            try:
                written = segment_stack(path, model, info, args, device, settings)
            except Exception as exc:  # noqa: BLE001 - one bad stack must not stop the others
                if explain_resource_error(exc, "", "") is not None:
                    raise  # out of memory / disk: the next stacks would fail the same way
                where, reason = skip_reason(exc, [str(path)])
                logger.debug("stack %s failed", path, exc_info=exc)
                logger.error("Skipped %s: %s", where, reason)
                skipped.append((where, reason))
                continue
            tqdm.write(str(written), file=sys.stdout)
    table = write_skipped(Path(args.output), skipped)
    if table is not None:
        logger.error("%d of %d stack(s) skipped (listed in %s); the others were segmented.", len(skipped),
                     len(stacks), table)
        return 1
    return 0
