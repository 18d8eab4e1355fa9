"""The offline sample of 3D instance segmentation: nuclei in a fluorescence-like stack, cut in four.

Source: the 3D test stack that the ``stardist`` PyPI package ships (``stardist/data/images/
img3d.tif`` and its instance mask ``mask3d.tif``; BSD-3-Clause, Copyright (c) 2018-2025 Uwe
Schmidt, Martin Weigert, see the package's licence file). stardist's own docstring calls it
"synthetic nuclei": a simulated stack, not a microscope acquisition. It is 57 x 61 x 31 voxels
(X, Y, Z), uint16, with 51 labelled nuclei, and states no voxel size (its TIFF resolution is the
default 1 / 1 without a unit): the spacing used and written here is 1.0 along every axis, i.e.
voxels, not micrometres.

``requirements-data.txt`` installs ``stardist`` with ``--no-deps``; only its two files are read
(by path, see :mod:`.packages`), the package is never imported.

Held-out protocol: one stack is too small to hold out whole stacks, so it is cut into four
quadrants along X and Y (the full Z each). An object cut by the split stays as the part inside
each quadrant (partial objects at the cut faces, as at any stack border); each quadrant's labels
are renumbered 1..n. Fold ``k`` tests on quadrant ``k``, validates on quadrant ``(k + 1) % 4``
and trains on the other two: every quadrant is test data exactly once.

Files (paths in the datalists are relative to their folder)::

    OUT/images/nuclei_q0.tif ... nuclei_q2.tif, nuclei_q3.nii.gz
    OUT/labels/nuclei_q0.tif ... nuclei_q2.tif, nuclei_q3.nii.gz
    OUT/fold0.json ... fold3.json

Quadrants 0-2 are ImageJ TIFF stacks, quadrant 3 is NIfTI: the folder is a mixed-format input,
as the commands accept. Each quadrant is written once, so a prediction's name (``nuclei_q3``)
points at one reference.

Command line::

    python -m dinov2.sample_data.instances --out data/nuclei
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from dinov2.data.datalist import write_datalist
from dinov2.eval.instances.io import new_stack, read_image, read_labels, write_labels, write_stack
from dinov2.eval.instances.postprocess import relabel_by_size
from dinov2.utils.entry_point import add_debug_flag, entry_point, start_entry_point

from .packages import require_file

logger = logging.getLogger("dinov2.sample_data.instances")

STARDIST_IMAGE = "data/images/img3d.tif"
STARDIST_MASK = "data/images/mask3d.tif"
# stardist's stack states no voxel size; 1.0 (voxels) is what is written and documented
SPACING = (1.0, 1.0, 1.0)
N_QUADRANTS = 4
NIFTI_QUADRANTS = (3,)
NAME = "nuclei_q{}"


def quadrant_slices(shape: Sequence[int]) -> list[tuple[slice, slice, slice]]:
    """The four quadrants of an ``(X, Y, Z)`` grid cut at the middle of X and of Y (full Z each):
    0 = low X low Y, 1 = high X low Y, 2 = low X high Y, 3 = high X high Y. They tile the grid."""
    mid_x, mid_y = int(shape[0]) // 2, int(shape[1]) // 2
    low_x, high_x = slice(0, mid_x), slice(mid_x, int(shape[0]))
    low_y, high_y = slice(0, mid_y), slice(mid_y, int(shape[1]))
    full_z = slice(0, int(shape[2]))
    return [(low_x, low_y, full_z), (high_x, low_y, full_z), (low_x, high_y, full_z), (high_x, high_y, full_z)]


def split_quadrants(image: np.ndarray, labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(image, labels)`` of each quadrant (:func:`quadrant_slices`), labels renumbered 1..n.

    Args:
        image: ``(X, Y, Z)`` intensities.
        labels: ``(X, Y, Z)`` integer instance ids on the same grid.

    Returns:
        Four ``(image (x, y, Z), labels (x, y, Z) int32)`` pairs; an object cut by the split keeps
        its part in each quadrant it touches.
    """
    if image.shape != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} must share one grid")
    return [(np.ascontiguousarray(image[box]), relabel_by_size(np.ascontiguousarray(labels[box])))
            for box in quadrant_slices(image.shape)]


def _entry(out_dir: Path, k: int) -> dict:
    suffix = ".nii.gz" if k in NIFTI_QUADRANTS else ".tif"
    name = NAME.format(k)
    return {"image": str(out_dir / "images" / f"{name}{suffix}"), "label": str(out_dir / "labels" / f"{name}{suffix}"),
            "spacing": list(SPACING), "name": name}


def fold_datalist(entries: Sequence[dict], k: int) -> dict:
    """The datalist of fold ``k``: test = quadrant k, validation = (k + 1) % 4, training = the other two."""
    validation = (k + 1) % N_QUADRANTS
    return {
        "name": f"stardist synthetic 3D nuclei, fold {k}",
        "description": (
            "Quadrants of the synthetic 3D nuclei stack shipped by the stardist package (img3d.tif, mask3d.tif; "
            "BSD-3-Clause). Test = one quadrant, validation = the next, training = the other two. No voxel size "
            "is known: spacing 1.0 (voxels). Written by python -m dinov2.sample_data.instances."
        ),
        "fold": k,
        "training": [entries[i] for i in range(N_QUADRANTS) if i not in (k, validation)],
        "validation": [entries[validation]],
        "test": [entries[k]],
    }


def write_instances_dataset(out_dir: str | os.PathLike) -> list[Path]:
    """Write the four quadrant stacks, their label stacks and the four fold datalists.

    Args:
        out_dir: the output folder (created); existing files of the same names are replaced.

    Returns:
        The paths of ``fold0.json`` .. ``fold3.json``.

    Raises:
        SampleDataError: stardist is not installed (the message gives the install command).
    """
    out_dir = Path(out_dir).resolve()
    image = read_image(require_file("stardist", STARDIST_IMAGE), spacing=SPACING)
    labels = read_labels(require_file("stardist", STARDIST_MASK), like=image, spacing=SPACING)
    entries = []
    for k, (part, part_labels) in enumerate(split_quadrants(image.array, labels.array)):
        entry = _entry(out_dir, k)
        kind = "nifti" if k in NIFTI_QUADRANTS else "tiff"
        like = new_stack(part, SPACING, kind, entry["image"])
        # the source is uint16 and integer-valued: kept as it is
        write_stack(entry["image"], part.astype(np.uint16), like)
        write_labels(entry["label"], part_labels, like)
        entries.append(entry)
        logger.info("%s: %s voxels, %d objects", entry["name"], list(part.shape), int(part_labels.max()))
    return [write_datalist(fold_datalist(entries, k), out_dir / f"fold{k}.json", relative=True)
            for k in range(N_QUADRANTS)]


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the sample and print the fold datalists."""
    parser = argparse.ArgumentParser(prog="python -m dinov2.sample_data.instances",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    start_entry_point(logging.WARNING, tune_allocator=False)
    for path in write_instances_dataset(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
