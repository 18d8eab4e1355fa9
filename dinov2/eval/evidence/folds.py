"""Cross-validation folds of the training hemisphere, and an optional buffer that keeps them apart.

Neighbouring examples share voxels (patch cubes overlap their neighbours at a 4-voxel stride)
or context (tokens of one window attend to each other), and the same site is cut from both
templates. A random K-fold split would score the probe on near-copies of what it was fitted on.
Folds are therefore spatial (``--cv-grouping``):

* ``blocks`` (the default): the items' centres (world mm) are binned into cubic blocks of side
  ``--cv-block-mm``, on a grid centred on the centres' bounding box, so items at one centre (one
  site in both templates) share a block. Blocks are dealt to the K folds largest first (ties: the
  lower block index), each to the fold whose class counts it brings closest to the ideal, 1/K of
  every class and of all items (squared deviations relative to the ideal; ties: the smaller fold,
  then the lower index), so every fold holds every lobe as far as the blocks allow and the
  held-out folds look like the test hemisphere, which holds every lobe.
* ``z-slabs`` (the former default, to reproduce earlier numbers): items are grouped by the z row
  of their centre and the rows, bottom to top, are cut into K runs holding about the same number
  of items: fold ``f`` is the ``f``-th slab from the bottom. The slabs differ in lobe mix (the
  bottom one has no parietal items, the top one no temporal or limbic ones).

**Buffer** (``--cv-buffer``, off by default): while fold ``f`` is held out, the probe is fitted
on the items of the other folds whose input shares no voxel with the input of any item of fold
``f`` (:func:`buffered_training`). An item's input is the box of atlas voxels it shows
(:attr:`~.tasks.TaskSplit.input_box`): its cube in the patch task, so two cubes overlap when
their centres are closer than the cube side along every axis; its token's whole window in the
dense task, since a token's feature depends on every voxel of its window, so a token is dropped
when its window overlaps the window of a held-out token (its own window included). Fitting and
validation inputs then never share a voxel. It is off by default because it makes the CV answer
another question than the test: every test item has a counterpart at the same (mirrored)
position in training, whereas with the buffer every validation item lies a cube side or more
from anything fitted on (and a 32 mm cube's buffer spans the hemisphere's whole width), so the
CV measures extrapolation across the brain, scores not far above chance for every network and
prefers the strongest penalty, while the test prefers the weakest. Without it, validation
items keep overlapping neighbours across the block faces, much as test items keep their
mirrored twins in training.
"""

from __future__ import annotations

import torch

from .errors import EvidenceError
from .tasks import NUM_CLASSES, TaskData, TaskSplit

DEFAULT_FOLDS = 4
GROUPINGS = ("blocks", "z-slabs")
DEFAULT_GROUPING = "blocks"
# The training items' centres span about 50-70 x 170-185 x 110-120 mm (x, y, z): 48 mm blocks
# make a 2 x 4 x 3 grid (about 20 non-empty blocks), so every lobe spans several blocks and each
# of 4 folds can get some of each, while a block is still wider than a 32 mm patch cube.
DEFAULT_BLOCK_MM = 48.0
DEFAULT_BUFFER = False


def _slab_starts(counts: torch.Tensor, folds: int) -> list[int]:
    """First row of every slab after the bottom one.

    Args:
        counts: int ``(R,)`` items per z row, bottom row first.
        folds: ``K``, at most ``R``.

    Returns:
        ``K - 1`` increasing row indices in ``[1, R)``.
    """
    below = torch.cumsum(counts, 0).tolist()  # below[r]: items on rows 0..r
    total, rows, starts = below[-1], len(below), []
    for f in range(1, folds):
        # Every slab keeps at least one row, and leaves one for each slab above it.
        candidates = range((starts[-1] if starts else 0) + 1, rows - (folds - f) + 1)
        starts.append(min(candidates, key=lambda r: (abs(below[r - 1] - f * total / folds), r)))
    return starts


def z_slab_folds(z_mm: torch.Tensor, folds: int = DEFAULT_FOLDS) -> list[torch.Tensor]:
    """Split items into ``folds`` contiguous z slabs of about equal size.

    Args:
        z_mm: float ``(T,)`` world z (mm) of every training item's centre; items on one row
            must hold the same value (they do: one formula of the row index).
        folds: ``K``.

    Returns:
        ``K`` sorted int64 index tensors into the ``T`` items, bottom slab first: disjoint,
        together all items, and every item of fold ``f`` below every item of fold ``f + 1``.

    Raises:
        EvidenceError: ``folds < 2`` or fewer distinct z rows than folds.
    """
    rows, row_of_item, counts = torch.unique(z_mm, sorted=True, return_inverse=True, return_counts=True)
    if folds < 2 or rows.numel() < folds:
        raise EvidenceError(f"--cv-folds {folds}: cross-validation needs at least 2 folds and at most one per z "
                            f"row of the training hemisphere ({rows.numel()} rows); pass e.g. --cv-folds "
                            f"{max(2, min(DEFAULT_FOLDS, rows.numel()))}.")
    starts = torch.tensor(_slab_starts(counts, folds))
    fold_of_item = torch.bucketize(torch.arange(rows.numel()), starts, right=True)[row_of_item]
    return [torch.nonzero(fold_of_item == f).flatten() for f in range(folds)]


def block_of_items(centre_mm: torch.Tensor, block_mm: float = DEFAULT_BLOCK_MM) -> torch.Tensor:
    """The cubic block of every item's centre.

    The grid holds ``floor(extent / block_mm) + 1`` blocks along each axis, centred on the
    bounding box of the centres, so it does not depend on where the world origin lies.

    Args:
        centre_mm: float ``(T, 3)`` world ``(x, y, z)`` of every item's centre.
        block_mm: block side in mm.

    Returns:
        int64 ``(T,)`` block index of every item, ``0 .. B-1`` over the non-empty blocks in
        lexicographic ``(x, y, z)`` order of their grid cells; equal centres get equal blocks.
    """
    centre = centre_mm.double()
    low, high = centre.min(dim=0).values, centre.max(dim=0).values
    cells = torch.floor((high - low) / block_mm) + 1
    origin = (low + high) / 2 - cells * block_mm / 2
    cell = torch.floor((centre - origin) / block_mm).long()
    return torch.unique(cell, dim=0, return_inverse=True)[1]


def class_counts_by_group(group: torch.Tensor, labels: torch.Tensor, groups: int) -> torch.Tensor:
    """int64 ``(groups, NUM_CLASSES)``: items of every class in every group (``group``: ``(T,)`` indices)."""
    counts = torch.zeros(groups, NUM_CLASSES, dtype=torch.int64)
    counts.index_put_((group, labels), torch.ones_like(labels), accumulate=True)
    return counts


def assign_blocks(block_counts: torch.Tensor, folds: int) -> torch.Tensor:
    """Deal blocks to folds so that every fold's class counts come close to 1/K of each class.

    Args:
        block_counts: int ``(B, C)`` items of every class in every block.
        folds: ``K``.

    Returns:
        int64 ``(B,)`` fold of every block. Blocks go largest first (ties: lower index), each to
        the fold where it lowers most (or raises least) the sum over classes, and over all items,
        of ``((count - ideal) / ideal)^2`` with ``ideal`` = total / K; ties: the smaller fold,
        then the lower fold index. Deterministic.
    """
    counts = torch.cat([block_counts, block_counts.sum(dim=1, keepdim=True)], dim=1).double()  # last: all items
    ideal = counts.sum(dim=0) / folds
    weight = torch.where(ideal > 0, 1.0 / ideal.clamp_min(1e-12) ** 2, torch.zeros_like(ideal))
    held = torch.zeros(folds, counts.shape[1], dtype=torch.float64)
    fold_of_block = torch.empty(counts.shape[0], dtype=torch.int64)
    for b in sorted(range(counts.shape[0]), key=lambda b: (-counts[b, -1].item(), b)):
        change = (((held + counts[b] - ideal) ** 2 - (held - ideal) ** 2) * weight).sum(dim=1)
        f = min(range(folds), key=lambda f: (change[f].item(), held[f, -1].item(), f))
        fold_of_block[b] = f
        held[f] += counts[b]
    return fold_of_block


def block_folds(centre_mm: torch.Tensor, labels: torch.Tensor, folds: int = DEFAULT_FOLDS,
                block_mm: float = DEFAULT_BLOCK_MM) -> list[torch.Tensor]:
    """Class-representative folds made of whole cubic blocks of item centres.

    Args:
        centre_mm: float ``(T, 3)`` world ``(x, y, z)`` of every training item's centre.
        labels: int64 ``(T,)`` class of every item.
        folds: ``K``.
        block_mm: block side in mm (:func:`block_of_items`).

    Returns:
        ``K`` sorted int64 index tensors into the ``T`` items: disjoint, together all items,
        each a union of whole blocks (:func:`assign_blocks`).

    Raises:
        EvidenceError: ``folds < 2``, a block side that is not positive, or fewer blocks than folds.
    """
    if not block_mm > 0:
        raise EvidenceError(f"--cv-block-mm {block_mm}: the block side must be positive, e.g. --cv-block-mm "
                            f"{DEFAULT_BLOCK_MM:g}.")
    block = block_of_items(centre_mm, block_mm)
    blocks = int(block.max()) + 1
    if folds < 2 or blocks < folds:
        raise EvidenceError(f"--cv-folds {folds} with --cv-block-mm {block_mm:g}: cross-validation needs at least 2 "
                            f"folds and at most one per block ({blocks} blocks); pass a smaller --cv-block-mm or "
                            f"e.g. --cv-folds {max(2, min(DEFAULT_FOLDS, blocks))}.")
    fold_of_item = assign_blocks(class_counts_by_group(block, labels, blocks), folds)[block]
    return [torch.nonzero(fold_of_item == f).flatten() for f in range(folds)]


def overlapping_inputs(boxes: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """bool ``(A, B)``: whether input box ``a`` and input box ``b`` share a voxel.

    Args:
        boxes: int ``(A, 2, 3)`` voxel ranges ``[lo, hi)`` along three axes; others: ``(B, 2, 3)``.
    """
    low, high = boxes[:, None, 0], boxes[:, None, 1]
    return ((low < others[None, :, 1]) & (others[None, :, 0] < high)).all(dim=-1)


def buffered_training(folds: list[torch.Tensor], input_box: torch.Tensor) -> list[torch.Tensor]:
    """Per fold, the items the probe may be fitted on while that fold is held out.

    Args:
        folds: ``K`` disjoint int64 index tensors into the ``T`` items.
        input_box: int ``(T, 2, 3)`` atlas voxels ``[lo, hi)`` of every item's input.

    Returns:
        ``K`` sorted int64 index tensors: the items of the other folds whose input box shares no
        voxel with the input box of any item of the held-out fold.
    """
    # Items share few distinct boxes (a site in both templates, a window's tokens): compare those.
    boxes, box_of_item = torch.unique(input_box.reshape(-1, 6), dim=0, return_inverse=True)
    boxes = boxes.reshape(-1, 2, 3)
    overlaps = overlapping_inputs(boxes, boxes)
    fitted_on = []
    for held_out in folds:
        outside = torch.ones(box_of_item.numel(), dtype=torch.bool)
        outside[held_out] = False
        touched = overlaps[box_of_item[held_out]].any(dim=0)
        fitted_on.append(torch.nonzero(outside & ~touched[box_of_item]).flatten())
    return fitted_on


def describe_folds(folds: list[torch.Tensor], split: TaskSplit, fitted_on: list[torch.Tensor]) -> list[dict]:
    """JSON-ready description of every fold: its items, what the probe is fitted on while it is held out.

    Returns:
        Per fold ``{"examples", "class_counts", "centre_mm": {"low": [x, y, z], "high": [x, y, z]},
        "z_mm": [lowest, highest centre], "fitted_on_examples", "fitted_on_class_counts",
        "buffer_dropped"}`` (the last: items of the other folds left out for sharing voxels with it).
    """
    described = []
    for held_out, fitted in zip(folds, fitted_on):
        centres = split.centre_mm[held_out]
        described.append({
            "examples": int(held_out.numel()),
            "class_counts": torch.bincount(split.labels[held_out], minlength=NUM_CLASSES).tolist(),
            "centre_mm": {"low": centres.min(dim=0).values.tolist(), "high": centres.max(dim=0).values.tolist()},
            "z_mm": [float(centres[:, 2].min()), float(centres[:, 2].max())],
            "fitted_on_examples": int(fitted.numel()),
            "fitted_on_class_counts": torch.bincount(split.labels[fitted], minlength=NUM_CLASSES).tolist(),
            "buffer_dropped": int(split.labels.numel() - held_out.numel() - fitted.numel()),
        })
    return described


def _complements(folds: list[torch.Tensor], items: int) -> list[torch.Tensor]:
    """Per fold, every item of the other folds (no buffer)."""
    out = []
    for held_out in folds:
        keep = torch.ones(items, dtype=torch.bool)
        keep[held_out] = False
        out.append(torch.nonzero(keep).flatten())
    return out


def grouped_folds(split: TaskSplit, folds: int = DEFAULT_FOLDS, grouping: str = DEFAULT_GROUPING,
                  block_mm: float = DEFAULT_BLOCK_MM) -> tuple[list[torch.Tensor], str]:
    """The folds of a split's items under one grouping, and a sentence saying how they were made.

    Raises:
        EvidenceError: an unknown grouping, or folds that do not fit (see :func:`z_slab_folds`,
            :func:`block_folds`).
    """
    if grouping == "z-slabs":
        return z_slab_folds(split.z_mm, folds), "contiguous slabs of world z (item centres), bottom first"
    if grouping == "blocks":
        return (block_folds(split.centre_mm, split.labels, folds, block_mm),
                f"cubic blocks of {block_mm:g} mm (item centres), dealt to the folds by class counts")
    raise EvidenceError(f"--cv-grouping {grouping!r} is not one of {', '.join(GROUPINGS)}: pass e.g. "
                        f"--cv-grouping {DEFAULT_GROUPING}.")


def attach_folds(task: TaskData, folds: int = DEFAULT_FOLDS, grouping: str = DEFAULT_GROUPING,
                 block_mm: float = DEFAULT_BLOCK_MM, buffer: bool = DEFAULT_BUFFER) -> TaskData:
    """Set ``task.folds`` and ``task.fitted_on`` from its training items and describe them in ``task.info["cv"]``.

    Args:
        task: a task whose training split has ``centre_mm`` (and ``input_box`` with ``buffer``).
        folds: ``K``.
        grouping: ``blocks`` or ``z-slabs`` (see the module docstring).
        block_mm: block side in mm (``blocks`` only).
        buffer: fit each fold's probes without the items whose input shares a voxel with it.

    Returns:
        ``task``, changed in place.

    Raises:
        EvidenceError: an unknown grouping, folds that do not fit, or a buffer that leaves a
            fold nothing to fit on.
    """
    training = task.splits["training"]
    task.folds, how = grouped_folds(training, folds, grouping, block_mm)
    if buffer:
        task.fitted_on = buffered_training(task.folds, training.input_box)
    else:
        task.fitted_on = _complements(task.folds, training.labels.numel())
    empty = [f for f, fitted in enumerate(task.fitted_on) if fitted.numel() == 0]
    if empty:
        raise EvidenceError(f"--cv-buffer leaves fold(s) {empty} of the {task.name} task nothing to fit on (every "
                            "other item shares voxels with them): pass a larger --cv-block-mm, fewer --cv-folds or "
                            "--no-cv-buffer.")
    task.info["cv"] = {"folds": folds, "grouping": how, "block_mm": float(block_mm) if grouping == "blocks" else None,
                       "buffer": ("fitted without the items whose input shares a voxel with a held-out item's input"
                                  if buffer else None),
                       "by_fold": describe_folds(task.folds, training, task.fitted_on)}
    return task
