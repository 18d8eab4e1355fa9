"""The evidence command's cross-validation folds: class-representative blocks, the buffer, z slabs as they were."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dinov2.eval.evidence.errors import EvidenceError
from dinov2.eval.evidence.folds import (
    assign_blocks,
    attach_folds,
    block_folds,
    block_of_items,
    buffered_training,
    class_counts_by_group,
    z_slab_folds,
)
from dinov2.eval.evidence.probe import cross_validate
from dinov2.eval.evidence.tasks import NUM_CLASSES, TaskData, TaskSplit

pytestmark = pytest.mark.usefixtures("one_thread")


def lattice_layout(step: float = 8.0, shape=(6, 20, 15), templates: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Item centres on a ``step`` mm lattice (each centre ``templates`` times) and labels set by z alone.

    Labels are five bands of 24 mm along z, the way the lobes stack up (temporal at the bottom,
    parietal on top): every z slab holds one or two classes, but every class spans many blocks.

    Returns:
        ``(centre_mm (T, 3), labels (T,))``.
    """
    grid = torch.tensor(list(itertools.product(*(range(n) for n in shape))), dtype=torch.float64) * step
    centres = grid.repeat(templates, 1)
    labels = torch.clamp((centres[:, 2] // 24).long(), max=NUM_CLASSES - 1)
    return centres, labels


def fold_of(folds: list[torch.Tensor], items: int) -> torch.Tensor:
    out = torch.full((items,), -1, dtype=torch.long)
    for f, idx in enumerate(folds):
        assert (out[idx] == -1).all()  # disjoint
        out[idx] = f
    return out


# ------------------------------------------------------------------------------ blocks
def test_block_folds_are_disjoint_complete_and_made_of_whole_blocks():
    centres, labels = lattice_layout()
    folds = block_folds(centres, labels, 4, 24.0)
    owner = fold_of(folds, labels.numel())
    assert (owner >= 0).all() and torch.equal(torch.sort(torch.cat(folds)).values, torch.arange(labels.numel()))
    assert all(torch.equal(f, torch.sort(f).values) for f in folds)
    block = block_of_items(centres, 24.0)
    for b in block.unique():
        assert owner[block == b].unique().numel() == 1, b  # a block is never split
    # The same centre (one site in both templates) is always in one fold.
    _, centre_id = torch.unique(centres, dim=0, return_inverse=True)
    for c in centre_id.unique():
        assert owner[centre_id == c].unique().numel() == 1
    assert block.unique().numel() > 40  # the layout really has many blocks to deal


def test_blocks_tile_the_centres_with_the_given_side():
    centres, _ = lattice_layout()
    block = block_of_items(centres, 24.0)
    for b in block.unique():
        inside = centres[block == b]
        assert ((inside.max(dim=0).values - inside.min(dim=0).values) < 24.0).all()  # at most one side wide
    # Shifting every centre by the same vector shifts the grid with it: the same blocks.
    assert torch.equal(block, block_of_items(centres + torch.tensor([13.0, -700.0, 5.5], dtype=torch.float64), 24.0))
    # Extent 40 mm in x: 2 cells of 24 mm; 152 mm in y: 7; 112 mm in z: 5.
    assert block.unique().numel() == 2 * 7 * 5


def test_every_fold_holds_every_class_where_z_slabs_cannot():
    # Four 24 mm bands of z, one class each, and exactly four 24 mm blocks up every column: dealing
    # the blocks in turn would give each fold one class; dealing them by class counts gives all.
    centres, labels = lattice_layout(shape=(6, 20, 12))
    assert labels.unique().tolist() == [0, 1, 2, 3]
    folds = block_folds(centres, labels, 4, 24.0)
    counts = torch.stack([torch.bincount(labels[f], minlength=NUM_CLASSES)[:4] for f in folds])
    ideal = torch.bincount(labels)[:4] / 4
    assert (counts > 0).all(), counts
    assert ((counts - ideal).abs() <= 0.35 * ideal).all(), counts  # close to a quarter of every class
    sizes = torch.tensor([f.numel() for f in folds], dtype=torch.float64)
    assert sizes.max() <= 1.2 * sizes.min()
    # The same layout cut into z slabs: each slab sees a single class.
    slabs = z_slab_folds(centres[:, 2], 4)
    assert [labels[s].unique().tolist() for s in slabs] == [[0], [1], [2], [3]]


def test_assignment_follows_the_class_counts_greedily():
    """Hand-checked: single-class blocks are dealt so that each of two folds gets both classes.

    Ideal per fold: 14.5 of each class, 29 items. Block 0 opens fold 0 (tie: the lower fold);
    block 1 (the other class) helps an empty fold 1 more, as it also brings fold 1's size up;
    block 2 (class 0) then fills fold 1's missing class, block 3 fold 0's; blocks 4 and 5 (9 items
    each) tie for block 4 (fold 0) and then block 5 evens the sizes (fold 1).
    """
    counts = torch.tensor([[10, 0], [0, 10], [10, 0], [0, 10], [9, 0], [0, 9]])
    assert assign_blocks(counts, 2).tolist() == [0, 1, 1, 0, 0, 1]


def test_folds_are_deterministic_and_do_not_depend_on_item_order():
    centres, labels = lattice_layout()
    folds = block_folds(centres, labels, 4, 32.0)
    again = block_folds(centres, labels, 4, 32.0)
    assert all(torch.equal(a, b) for a, b in zip(folds, again))
    order = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))
    shuffled = block_folds(centres[order], labels[order], 4, 32.0)
    owner, owner_shuffled = fold_of(folds, labels.numel()), fold_of(shuffled, labels.numel())
    assert torch.equal(owner[order], owner_shuffled)  # the same fold for every item


def test_block_folds_refuse_more_folds_than_blocks():
    centres, labels = lattice_layout(shape=(2, 2, 2))  # 8 mm extent: one 24 mm block
    with pytest.raises(EvidenceError, match="--cv-block-mm"):
        block_folds(centres, labels, 4, 24.0)
    with pytest.raises(EvidenceError, match="--cv-block-mm"):
        block_folds(centres, labels, 4, 0.0)


def test_class_counts_by_group():
    counts = class_counts_by_group(torch.tensor([0, 2, 2, 0]), torch.tensor([1, 4, 4, 0]), 3)
    assert counts.tolist() == [[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 2]]


# ------------------------------------------------------------------------------ buffer
def _voxel_sets(boxes: torch.Tensor, side: int) -> np.ndarray:
    """bool ``(T, side, side, side)``: the voxels every box covers (an independent way to find overlaps)."""
    masks = np.zeros((boxes.shape[0], side, side, side), dtype=bool)
    for i, ((x0, y0, z0), (x1, y1, z1)) in enumerate(boxes.tolist()):
        masks[i, x0:x1, y0:y1, z0:z1] = True
    return masks


def test_buffer_drops_exactly_the_items_whose_input_shares_a_voxel_with_the_held_out_fold():
    g = torch.Generator().manual_seed(5)
    low = torch.randint(0, 20, (80, 3), generator=g)
    boxes = torch.stack([low, low + torch.randint(1, 9, (80, 3), generator=g)], dim=1)
    boxes = torch.cat([boxes, boxes[:10]])  # repeated inputs (one site in both templates)
    folds = [torch.arange(0, 90, 3), torch.arange(1, 90, 3), torch.arange(2, 90, 3)]
    masks = _voxel_sets(boxes, 30)
    fitted_on = buffered_training(folds, boxes)
    for held_out, fitted in zip(folds, fitted_on):
        union = masks[held_out.numpy()].any(axis=0)
        expected = [i for i in range(90) if i not in set(held_out.tolist()) and not (masks[i] & union).any()]
        assert fitted.tolist() == expected
        assert 0 < len(expected) < 90 - held_out.numel()  # the buffer dropped some, kept some


def test_buffer_on_patch_cubes_drops_centres_closer_than_the_cube_side_on_every_axis():
    """16-voxel cubes on a 4-voxel lattice: a neighbour stays only when it is 16 voxels away along some axis."""
    centres = torch.tensor(list(itertools.product(range(0, 60, 4), repeat=3)))
    boxes = torch.stack([centres - 8, centres + 8], dim=1)
    held = torch.nonzero((centres == torch.tensor([28, 28, 28])).all(dim=1)).flatten()
    rest = torch.nonzero((centres != torch.tensor([28, 28, 28])).any(dim=1)).flatten()
    fitted = buffered_training([held, rest], boxes)[0]
    far = ((centres - 28).abs() >= 16).any(dim=1)
    assert torch.equal(fitted, torch.nonzero(far).flatten())
    assert fitted.numel() == centres.shape[0] - 7 ** 3  # 7 lattice steps of 4 within 16 voxels, per axis


def _synthetic_task(grouping: str, buffer: bool) -> TaskData:
    centres, labels = lattice_layout(step=4.0, shape=(3, 16, 12))
    voxel = (centres / 2).long()  # a 2 mm grid, as the atlas
    boxes = torch.stack([voxel - 4, voxel + 4], dim=1)  # 8-voxel cubes
    training = TaskSplit(torch.zeros(labels.numel(), 1, 2, 2, 2), labels, centre_mm=centres, input_box=boxes)
    task = TaskData("patch", {"training": training, "test": training})
    return attach_folds(task, 4, grouping, 16.0, buffer)


def test_attach_folds_describes_each_fold_and_what_it_is_fitted_on():
    task = _synthetic_task("blocks", buffer=True)
    training = task.splits["training"]
    info = task.info["cv"]
    assert info["folds"] == 4 and info["block_mm"] == 16.0 and info["buffer"]
    for held_out, fitted, described in zip(task.folds, task.fitted_on, info["by_fold"]):
        assert described["examples"] == held_out.numel()
        assert described["class_counts"] == torch.bincount(training.labels[held_out], minlength=NUM_CLASSES).tolist()
        assert described["fitted_on_examples"] == fitted.numel()
        assert described["buffer_dropped"] == training.labels.numel() - held_out.numel() - fitted.numel() > 0
        assert not set(fitted.tolist()) & set(held_out.tolist())
    unbuffered = _synthetic_task("blocks", buffer=False)
    assert all(torch.equal(a, b) for a, b in zip(unbuffered.folds, task.folds))  # the buffer changes fits only
    assert all(d["buffer_dropped"] == 0 for d in unbuffered.info["cv"]["by_fold"])
    assert unbuffered.info["cv"]["buffer"] is None


def test_attach_folds_refuses_a_buffer_that_leaves_nothing_and_an_unknown_grouping():
    centres, labels = lattice_layout(step=4.0, shape=(2, 8, 8))
    voxel = (centres / 2).long()
    huge = torch.stack([voxel - 40, voxel + 40], dim=1)  # every input overlaps every other
    training = TaskSplit(torch.zeros(labels.numel(), 1, 2, 2, 2), labels, centre_mm=centres, input_box=huge)
    task = TaskData("patch", {"training": training, "test": training})
    with pytest.raises(EvidenceError, match="--cv-buffer"):
        attach_folds(task, 2, "blocks", 8.0, buffer=True)
    with pytest.raises(EvidenceError, match="--cv-grouping"):
        attach_folds(task, 2, "random", 8.0)


# ------------------------------------------------------------------------------ z slabs, as before
def test_z_slabs_are_unchanged_and_fitted_on_everything_else():
    task = _synthetic_task("z-slabs", buffer=False)
    training = task.splits["training"]
    expected = z_slab_folds(training.centre_mm[:, 2], 4)
    assert all(torch.equal(a, b) for a, b in zip(task.folds, expected))
    for held_out, fitted in zip(task.folds, task.fitted_on):
        assert torch.equal(torch.sort(torch.cat([held_out, fitted])).values, torch.arange(training.labels.numel()))
    # Fitting on the explicit complements gives the very numbers of fitting on "everything not held out".
    g = torch.Generator().manual_seed(2)
    features = torch.randn(training.labels.numel(), 6, generator=g) + torch.eye(5, 6)[training.labels] * 1.5
    implicit = cross_validate(features, training.labels, task.folds, NUM_CLASSES)
    explicit = cross_validate(features, training.labels, task.folds, NUM_CLASSES, fitted_on=task.fitted_on)
    assert implicit == explicit
    buffered = cross_validate(features, training.labels, task.folds, NUM_CLASSES,
                              fitted_on=_synthetic_task("z-slabs", buffer=True).fitted_on)
    assert buffered["cv_by_l2_per_fold"] != implicit["cv_by_l2_per_fold"]  # the buffer reaches the fits
