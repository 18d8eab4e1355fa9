"""The evidence command: clean splits and folds, labels that match the atlas, a sound probe, and the CLI end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2.checkpoints.finetuned import save_finetuned
from dinov2.checkpoints.teacher_export import save_teacher_checkpoint
from dinov2.eval.evidence import NEAR_DUPLICATE_FILES, held_out_files, pretraining_overlap
from dinov2.eval.evidence import probe as probe_module
from dinov2.eval.evidence import run as run_module
from dinov2.eval.evidence.__main__ import main
from dinov2.eval.evidence.backbones import random_backbone
from dinov2.eval.evidence.baselines import token_cubes
from dinov2.eval.evidence.dense_task import (
    band_rows,
    build_dense_task,
    cut_window,
    dense_band_rows,
    plan_dense_windows,
    to_token_cubes,
    token_labels,
    z_anchor_row,
)
from dinov2.eval.evidence.errors import EvidenceError
from dinov2.eval.evidence.features import last_blocks, network_features
from dinov2.eval.evidence.folds import attach_folds, block_of_items, overlapping_inputs, z_slab_folds
from dinov2.eval.evidence.patch_task import PATCH_PARAMS, build_patch_task, plan_evidence_sites, site_centre
from dinov2.eval.evidence.probe import L2_GRID, balanced_accuracy, choose_l2, cross_validate, fit_probe
from dinov2.eval.evidence.run import probe_scores, raw_scores
from dinov2.eval.evidence.tasks import SPLITS, TaskData, TaskSplit
from dinov2.eval.evidence.volumes import EvidenceVolumes, hemisphere_frames, load_evidence_volumes
from dinov2.eval.presets import DatasetPreset, load_preset
from dinov2.eval.segmentation.model import build_segmentation_model
from dinov2.models import build_model
from dinov2.sample_data import package_dir
from dinov2.sample_data.classification import TEMPLATES, plan_patch_sites

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
PATCH = (8, 8, 8)
TINY_SPEC = {"arch": "vit_tiny_3d", "kwargs": {"patch_size": 8, "img_size": 32}}


@pytest.fixture(scope="module")
def volumes() -> EvidenceVolumes:
    return load_evidence_volumes()


def tiny_teacher(path: Path, datalist: str | None = None) -> Path:
    """A random vit_tiny_3d (8^3 patches) saved as our teacher checkpoint."""
    torch.manual_seed(7)
    model = build_model("vit_tiny_3d", patch_size=8, img_size=32)
    config = {"student": {"arch": "vit_tiny_3d", "patch_size": 8}, "crops": {"global_crops_size": 32}}
    if datalist is not None:
        config["train"] = {"datalist": datalist}
    return save_teacher_checkpoint(path, {f"backbone.{k}": v for k, v in model.state_dict().items()}, config, 0)


# ------------------------------------------------------------------------------ held-out files
def test_held_out_files_are_the_evaluation_templates_and_their_near_duplicates():
    evaluation = held_out_files(include_near_duplicates=False)
    assert evaluation == [(package_dir(p) / r).resolve() for p, r in TEMPLATES.values()]
    everything = held_out_files()
    assert everything[:2] == evaluation
    assert {p.name for p in everything[2:]} == {Path(r).name for _, r in NEAR_DUPLICATE_FILES}
    assert all(p.is_file() for p in everything)


def test_overlap_check_resolves_datalist_paths_relative_to_the_datalist(tmp_path):
    held = held_out_files()
    near_duplicate = held[3]
    datalist = tmp_path / "lists" / "pretrain.json"
    datalist.parent.mkdir()
    other = tmp_path / "other.nii.gz"
    datalist.write_text(json.dumps([{"image": os.path.relpath(near_duplicate, datalist.parent)},
                                    {"image": str(other)}]))
    found = pretraining_overlap({"train": {"datalist": str(datalist)}}, held)
    assert found["checked"] and found["held_out_in_datalist"] == [str(near_duplicate)]
    datalist.write_text(json.dumps([{"image": str(other)}]))
    clean = pretraining_overlap({"train": {"datalist": str(datalist)}}, held)
    assert clean["checked"] and clean["held_out_in_datalist"] == []
    gone = pretraining_overlap({"train": {"datalist": str(tmp_path / "missing.json")}}, held)
    assert not gone["checked"] and "not on this machine" in gone["note"]
    assert not pretraining_overlap(None, held)["checked"]


# ------------------------------------------------------------------------------ dense split and labels
def test_dense_windows_respect_hemispheres_and_tile_the_whole_training_hemisphere(volumes):
    shape, affine = volumes.lobes.shape, volumes.affine
    windows = plan_dense_windows(shape, affine, 32, shifts=(0, 4))
    anchor = z_anchor_row(affine, 32)
    patch_band = band_rows(affine, PATCH_PARAMS.val_band_mm)
    band = dense_band_rows(patch_band, 32)
    # The z tiling keeps its anchor (the former validation band's lower edge): the test windows did not move.
    assert anchor == band[0] and band[0] <= patch_band[0] and patch_band[1] <= band[1] and band[1] - band[0] == 32
    midline = int(round(-affine[0, 3] / affine[0, 0]))
    assert {w.split for w in windows} == {"training", "test"}
    covered = {"training": np.zeros(shape, bool), "test": np.zeros(shape, bool)}
    for w in windows:
        (x0, x1), (y0, y1), (z0, z1) = w.atlas_box
        world_x = affine[0, 0] * np.arange(x0, x1) + affine[0, 3]
        assert not x0 <= midline < x1, w  # the midline column belongs to no window
        assert (world_x < 0).all() if w.split == "test" else (world_x > 0).all(), w
        assert (w.origin[2] - anchor) % 32 == 0, w
        covered[w.split][x0:x1, y0:y1, z0:z1] = True
    # Every voxel of each hemisphere lies in a window of its split: nothing is held back in training.
    world_x = affine[0, 0] * np.arange(shape[0]) + affine[0, 3]
    assert covered["training"][world_x > 0].all() and not covered["training"][world_x <= 0].any()
    assert covered["test"][world_x < 0].all() and not covered["test"][world_x >= 0].any()


def test_dense_task_inputs_come_from_the_right_place(volumes):
    """Templates that encode the atlas column and row: voxels from the right hemisphere, z where the task says."""
    columns, rows = np.indices(volumes.lobes.shape, dtype=np.float32)[[0, 2]]
    names = list(TEMPLATES)
    coded = EvidenceVolumes(volumes.regions, volumes.lobes, volumes.affine, {names[0]: columns, names[1]: rows})
    task = build_dense_task(coded, 32, PATCH)
    midline = int(round(-volumes.affine[0, 3] / volumes.affine[0, 0]))
    assert set(task.splits) == set(SPLITS) == {"training", "test"}
    for split_name, split in task.splits.items():
        half = split.inputs.shape[0] // 2  # windows of the first template, then of the second
        col = split.inputs[:half]
        col = col[col >= 0]  # -1 is padding
        assert ((col > midline) if split_name == "test" else (col < midline)).all(), split_name
        # Token z: the middle row of the token's cube, read back from the row-coded template.
        second = split.tokens[:, 0] >= half
        cubes = token_cubes(split.inputs, split.tokens[second], PATCH).flatten(1)
        inside = (cubes >= 0).all(dim=1)  # tokens wholly on the grid: their mean row is their middle
        expected = volumes.affine[2, 2] * cubes[inside].double().mean(dim=1) + volumes.affine[2, 3]
        torch.testing.assert_close(split.z_mm[second][inside], expected)
        assert inside.sum() > 500, split_name


def test_token_labels_match_the_atlas_on_a_hand_checked_window(volumes):
    frame = hemisphere_frames(volumes.affine, volumes.lobes.shape)["left"]  # mirrored: the tricky one
    origin = (13, 54, 28)  # a test window in the middle of the left hemisphere
    labels = token_labels(cut_window(frame.cut(volumes.lobes), origin, 32, -1), PATCH)
    lo, hi = frame.columns
    checked = 0
    for a in range(4):
        for b in range(4):
            for c in range(4):
                # frame index u shows atlas column hi - 1 - u: the token's 8 frame columns, mirrored back
                u0 = origin[0] + 8 * a
                xs = slice(hi - (u0 + 8), hi - u0)
                ys = slice(origin[1] + 8 * b, origin[1] + 8 * b + 8)
                zs = slice(origin[2] + 8 * c, origin[2] + 8 * c + 8)
                cube = volumes.lobes[xs, ys, zs]
                assert cube.size == 512
                counts = np.bincount(cube[cube >= 0], minlength=5)
                expected = int(counts.argmax()) if counts.sum() >= 128 else -1
                assert labels[(a * 4 + b) * 4 + c] == expected, (a, b, c)  # d fastest
                checked += expected >= 0
    assert checked >= 10


def test_token_order_is_the_backbones():
    """Token cubes are flattened as the patch embedding flattens its Conv3d output."""
    model = build_model("vit_tiny_3d", patch_size=4, img_size=16)
    with torch.no_grad():
        model.patch_embed.proj.weight.zero_()
        model.patch_embed.proj.weight[0].fill_(1 / 64)  # channel 0: the cube's mean
        model.patch_embed.proj.bias.zero_()
        x = torch.randn(2, 1, 8, 12, 16)
        embedded = model.patch_embed(x)[..., 0]
    cubes = to_token_cubes(x[:, 0], (4, 4, 4))
    torch.testing.assert_close(embedded, cubes.mean(-1), rtol=1e-5, atol=1e-6)
    tokens = torch.tensor([[1, 5], [0, 23]])
    picked = token_cubes(x, tokens, (4, 4, 4))
    torch.testing.assert_close(picked.flatten(1).mean(1), embedded[tokens[:, 0], tokens[:, 1]], rtol=1e-5, atol=1e-6)


def test_block_representations_are_the_normalised_outputs_of_the_last_blocks_earliest_first():
    """1 block = forward_features' normalised CLS + mean patch; n blocks = each block's, earliest first."""
    model = random_backbone(TINY_SPEC, 3)
    x = torch.randn(5, 1, 16, 16, 16)
    patch_split, depth = TaskSplit(x, torch.zeros(5, dtype=torch.int64)), len(model.blocks)
    one = network_features(model, patch_split, 2, "cpu", blocks=1)
    with torch.no_grad():
        out = model.forward_features(x)
        blocks = [model.norm(t) for t in _block_outputs(model, x)]
    torch.testing.assert_close(one, torch.cat([out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(1)], 1))
    every = network_features(model, patch_split, 2, "cpu", blocks=depth + 3)  # capped at the depth
    assert every.shape == (5, 2 * model.embed_dim * depth)
    expected = torch.cat([torch.cat([b[:, 0], b[:, 1:].mean(1)], 1) for b in blocks], 1)
    torch.testing.assert_close(every, expected)
    torch.testing.assert_close(last_blocks(every, depth, 1), one)
    tokens = torch.tensor([[0, 3], [4, 7]])
    dense = network_features(model, TaskSplit(x, torch.zeros(2, dtype=torch.int64), tokens=tokens), 8, "cpu", blocks=2)
    torch.testing.assert_close(dense, torch.cat([blocks[-2][tokens[:, 0], 1 + tokens[:, 1]],
                                                 blocks[-1][tokens[:, 0], 1 + tokens[:, 1]]], 1))


def _block_outputs(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's un-normalised output, run by hand (CLS first, no registers)."""
    with torch.no_grad():
        tokens, outputs = model.prepare_tokens_with_masks(x), []
        for block in model.blocks:
            tokens = block(tokens)
            outputs.append(tokens)
    return outputs


ONE_TEMPLATE = dataclasses.replace(PATCH_PARAMS, templates=(next(iter(TEMPLATES)),))  # half the cubes: faster


def test_patch_training_split_is_the_whole_training_hemisphere_and_test_is_unchanged(volumes):
    own = plan_patch_sites(volumes.lobes, volumes.regions, volumes.affine, PATCH_PARAMS)
    sites = plan_evidence_sites(volumes)
    assert [s for s in sites if s.split == "test"] == [s for s in own if s.split == "test"]
    training = {s.origin: s for s in sites if s.split == "training"}
    assert {s.hemisphere for s in training.values()} == {PATCH_PARAMS.train_hemisphere}
    held_back = {s.origin for s in own if s.split in ("training", "validation")}
    assert held_back < set(training)  # classification_sample's training and validation sites, and more:
    band = band_rows(volumes.affine, PATCH_PARAMS.val_band_mm)
    for origin in set(training) - held_back:  # only those it dropped for touching its validation band
        k, p = origin[2], PATCH_PARAMS.patch_size
        assert k < band[1] and k + p > band[0] and not (band[0] <= k and k + p <= band[1]), origin
    # Same lattice as the test sites (the x/y offsets and the z phase), and as many as in the test hemisphere.
    stride = PATCH_PARAMS.stride
    phase = lambda o: (o[0] % stride, o[1] % stride, o[2] % stride)  # noqa: E731
    assert {phase(o) for o in training} == {phase(s.origin) for s in own}
    assert 0.9 < len(training) / sum(s.split == "test" for s in own) < 1.1


def test_patch_size_16_gives_classification_samples_own_patches(volumes):
    """The default cube is the site's patch, cut and mirrored exactly as before the option existed."""
    task = build_patch_task(volumes, patch_size=16)
    sites = plan_evidence_sites(volumes)
    for split_name, split in task.splits.items():
        patches = []
        for name in PATCH_PARAMS.templates:
            for site in (s for s in sites if s.split == split_name):
                i, j, k = site.origin
                patch = volumes.templates[name][i:i + 16, j:j + 16, k:k + 16]
                patches.append(patch[::-1] if site.hemisphere == "left" else patch)
        expected = torch.from_numpy(np.ascontiguousarray(np.stack(patches))).unsqueeze(1)
        assert torch.equal(split.inputs, expected), split_name
    assert task.info["input_voxels"] == 16 and task.info["input_mm"] == 32


@pytest.mark.parametrize("size", [16, 24, 32])
def test_cubes_are_centred_on_the_labelled_voxel_with_the_left_side_mirrored(volumes, size):
    as_image = {name: volumes.lobes.astype(np.float32) for name in TEMPLATES}
    coded = EvidenceVolumes(volumes.regions, volumes.lobes, volumes.affine, as_image)
    task = build_patch_task(coded, ONE_TEMPLATE, patch_size=size)
    sites = plan_evidence_sites(volumes)
    c = size // 2
    for split_name, split in task.splits.items():
        assert split.inputs.shape == (sum(s.split == split_name for s in sites), 1, size, size, size)
        # The labelled atlas voxel sits at index N//2; mirroring moves it to N - 1 - N//2 along x.
        x = size - 1 - c if split_name == "test" else c
        assert torch.equal(split.inputs[:, 0, x, c, c].long(), split.labels), split_name
        centres = torch.tensor([site_centre(s) for s in sites if s.split == split_name], dtype=torch.float64)
        world = torch.tensor(np.diag(volumes.affine)[:3]) * centres + torch.tensor(volumes.affine[:3, 3])
        torch.testing.assert_close(split.centre_mm, world)
        torch.testing.assert_close(split.z_mm, world[:, 2])


def _index_coded(volumes: EvidenceVolumes, axes: tuple[int, int]) -> EvidenceVolumes:
    """Templates holding every voxel's atlas index along ``axes[0]`` (first template) and ``axes[1]`` (second)."""
    index = np.indices(volumes.lobes.shape, dtype=np.float32)
    return EvidenceVolumes(volumes.regions, volumes.lobes, volumes.affine,
                           {name: index[axis] for name, axis in zip(TEMPLATES, axes)})


@pytest.mark.parametrize("name", ["patch", "dense"])
def test_item_centres_and_input_boxes_are_where_the_inputs_show(volumes, name):
    """Read back from index-coded templates: the box spans the real (non-air) voxels of the item's
    input (its cube, or its token's window), the centre is the cube's labelled voxel or the token's middle."""
    scale, offset = torch.tensor(np.diag(volumes.affine)[:3]), torch.tensor(volumes.affine[:3, 3])
    for axes in ((0, 1), (2, 2)):
        coded = _index_coded(volumes, axes)
        task = build_patch_task(coded, folds=4) if name == "patch" else build_dense_task(coded, 32, PATCH, folds=4)
        for split_name, split in task.splits.items():
            half = split.inputs.shape[0] // 2  # inputs of the first template, then of the second
            window = torch.arange(split.labels.numel()) if split.tokens is None else split.tokens[:, 0]
            for t, axis in enumerate(axes):
                items = torch.nonzero((window >= t * half) & (window < (t + 1) * half)).flatten()
                shown = split.inputs[window[items], 0].double()
                real = shown >= 0
                low = torch.where(real, shown, torch.inf).flatten(1).amin(dim=1)
                high = torch.where(real, shown, -torch.inf).flatten(1).amax(dim=1)
                assert torch.equal(split.input_box[items, 0, axis].double(), low), (split_name, axis)
                assert torch.equal(split.input_box[items, 1, axis].double(), high + 1), (split_name, axis)
                if split.tokens is None:
                    c = shown.shape[-1] // 2
                    middle = shown[:, shown.shape[-1] - 1 - c if split_name == "test" else c, c, c]
                else:
                    cubes = token_cubes(split.inputs, split.tokens[items], PATCH).flatten(1).double()
                    inside = (cubes >= 0).all(dim=1)  # tokens wholly on the grid: their mean index is their middle
                    items, middle = items[inside], cubes[inside].mean(dim=1)
                    assert inside.sum() > 500
                expected = scale[axis] * middle + offset[axis]
                torch.testing.assert_close(split.centre_mm[items, axis], expected, msg=f"{split_name} {axis}")


def test_wide_cubes_never_show_the_other_hemisphere(volumes):
    """N=32 cubes equal the template with the other hemisphere (and the midline) blanked, padded with air."""
    size, name = 32, ONE_TEMPLATE.templates[0]
    task = build_patch_task(volumes, ONE_TEMPLATE, patch_size=size)
    sites = plan_evidence_sites(volumes, ONE_TEMPLATE)
    midline = int(round(-volumes.affine[0, 3] / volumes.affine[0, 0]))
    world_x = volumes.affine[0, 0] * np.arange(volumes.lobes.shape[0]) + volumes.affine[0, 3]
    template = volumes.templates[name]
    blanked = {}
    for hemisphere, own in (("right", world_x > 0), ("left", world_x < 0)):
        other = template.copy()
        other[~own] = -1.0  # the other hemisphere and the midline column (world x = 0)
        blanked[hemisphere] = np.pad(other, size, constant_values=-1.0)
    padded = np.pad(template, size, constant_values=-1.0)
    reached_across = 0
    for split_name, split in task.splits.items():
        for cube, site in zip(split.inputs[:, 0].numpy(), (s for s in sites if s.split == split_name)):
            lo = [v - size // 2 + size for v in site_centre(site)]  # + size: the padding
            box = tuple(slice(a, a + size) for a in lo)
            expected, unblanked = blanked[site.hemisphere][box], padded[box]
            if site.hemisphere == "left":
                expected, unblanked = expected[::-1], unblanked[::-1]
            assert np.array_equal(cube, expected), (split_name, site)
            reached_across += not np.array_equal(expected, unblanked)
    assert abs(world_x[midline]) < 1e-6
    assert reached_across > 100  # near-midline cubes do reach across: the blanking was exercised


# ------------------------------------------------------------------------------ cross-validation folds
def test_z_slab_folds_cut_rows_into_contiguous_slabs_of_about_equal_size():
    z = torch.tensor([0.0] * 30 + [2.0] * 10 + [4.0] * 25 + [6.0] * 5 + [8.0] * 30)[torch.randperm(100)]
    folds = z_slab_folds(z, 4)
    assert torch.equal(torch.sort(torch.cat(folds)).values, torch.arange(100))  # disjoint, covering
    for lower, upper in zip(folds, folds[1:]):
        assert z[lower].max() < z[upper].min()
    # Items below each row boundary: 30, 40, 65, 70; the cuts are those nearest 25, 50, 75 items.
    assert [f.numel() for f in folds] == [30, 10, 30, 30]
    with pytest.raises(EvidenceError, match="--cv-folds"):
        z_slab_folds(z, 6)  # 5 rows
    with pytest.raises(EvidenceError, match="--cv-folds"):
        z_slab_folds(z, 1)


def _task_with_coded_columns(volumes: EvidenceVolumes, name: str, grouping: str = "z-slabs",
                             buffer: bool = False) -> TaskData:
    """A task whose first template holds every voxel's atlas column (to tell the hemispheres apart)."""
    columns = np.indices(volumes.lobes.shape, dtype=np.float32)[0]
    coded = EvidenceVolumes(volumes.regions, volumes.lobes, volumes.affine, {n: columns for n in TEMPLATES})
    cv = {"folds": 4, "grouping": grouping, "buffer": buffer}
    return build_patch_task(coded, **cv) if name == "patch" else build_dense_task(coded, 32, PATCH, **cv)


def _shows_training_hemisphere_only(volumes: EvidenceVolumes, training: TaskSplit, fold: torch.Tensor) -> bool:
    midline = int(round(-volumes.affine[0, 3] / volumes.affine[0, 0]))
    windows = fold if training.tokens is None else training.tokens[fold, 0].unique()
    shown = training.inputs[windows]
    return bool((shown[shown >= 0] < midline).all())


@pytest.mark.parametrize("name", ["patch", "dense"])
def test_task_folds_are_disjoint_contiguous_z_slabs_of_training_items_only(volumes, name):
    task = _task_with_coded_columns(volumes, name)
    training = task.splits["training"]
    n = training.labels.numel()
    assert len(task.folds) == 4 and all(f.numel() > 0.1 * n for f in task.folds)
    assert torch.equal(torch.sort(torch.cat(task.folds)).values, torch.arange(n))  # disjoint and covering
    for lower, upper in zip(task.folds, task.folds[1:]):  # each fold one slab, bottom first
        assert training.z_mm[lower].max() < training.z_mm[upper].min()
    # No test item in any fold: every input a fold holds shows only training-hemisphere columns.
    assert all(_shows_training_hemisphere_only(volumes, training, fold) for fold in task.folds)
    if name == "dense":  # tokens lie on one z lattice: a token cube never spans two folds
        half = PATCH[2] * abs(volumes.affine[2, 2]) / 2
        for f, idx in enumerate(task.folds[:-1]):
            assert training.z_mm[idx].max() + half <= training.z_mm[task.folds[f + 1]].min() - half
    info = task.info["cv"]
    assert info["folds"] == 4 and sum(sl["examples"] for sl in info["by_fold"]) == n
    assert [sum(c) for c in zip(*(sl["class_counts"] for sl in info["by_fold"]))] == training.class_counts()
    assert all(sl["fitted_on_examples"] == n - sl["examples"] for sl in info["by_fold"])


@pytest.mark.parametrize("name", ["patch", "dense"])
def test_task_block_folds_hold_every_lobe_and_the_buffer_keeps_fits_off_their_voxels(volumes, name):
    task = _task_with_coded_columns(volumes, name, "blocks", buffer=True)
    training = task.splits["training"]
    n = training.labels.numel()
    assert torch.equal(torch.sort(torch.cat(task.folds)).values, torch.arange(n))  # disjoint and covering
    block = block_of_items(training.centre_mm, 48.0)
    for f, fold in enumerate(task.folds):
        inside = torch.zeros(n, dtype=torch.bool)
        inside[fold] = True
        assert all(inside[block == b].all() for b in block[fold].unique())  # whole blocks only
        assert (torch.bincount(training.labels[fold], minlength=5) > 0).all(), f  # every lobe, unlike z slabs
        assert _shows_training_hemisphere_only(volumes, training, fold)
        # Fitted on other folds' items whose input shares no voxel with any held-out input; the others
        # left out do share one.
        fitted = task.fitted_on[f]
        assert not inside[fitted].any() and fitted.numel() > 0
        assert not overlapping_inputs(training.input_box[fitted], training.input_box[fold]).any()
        left_out = torch.nonzero(~inside & ~torch.isin(torch.arange(n), fitted)).flatten()
        assert overlapping_inputs(training.input_box[left_out], training.input_box[fold]).any(dim=1).all()
        assert task.info["cv"]["by_fold"][f]["buffer_dropped"] == left_out.numel() > 0


# ------------------------------------------------------------------------------ probe and baseline
def _blobs(n: int, generator: torch.Generator, spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(n) % 5
    centres = torch.eye(5, 12) * 6
    return centres[labels] + spread * torch.randn(n, 12, generator=generator), labels


def _folds(n: int, k: int = 4) -> list[torch.Tensor]:
    """Folds of ``n`` items on ``n // 5`` z rows (five consecutive items, all classes, per row)."""
    return z_slab_folds(2.0 * (torch.arange(n) // 5).double(), k)


def test_probe_separates_separable_data_and_stays_at_chance_on_shuffled_labels():
    g = torch.Generator().manual_seed(0)
    (tx, ty), (sx, sy) = (_blobs(n, g, 1.0) for n in (400, 1000))
    folds = _folds(400)
    cv = cross_validate(tx, ty, folds, 5)
    probe = fit_probe(tx, ty, 5, cv["l2"])
    assert cv["cv_balanced_accuracy"] > 0.95 and balanced_accuracy(probe.predict(sx), sy) > 0.95
    again = fit_probe(tx, ty, 5, cross_validate(tx, ty, folds, 5)["l2"])
    assert torch.equal(again.weight, probe.weight) and again.l2 == probe.l2  # deterministic
    # Shuffled labels carry no information about the features: the probe cannot beat chance.
    shuffle = lambda y: y[torch.randperm(y.numel(), generator=g)]  # noqa: E731
    noisy = shuffle(ty)
    noise = fit_probe(tx, noisy, 5, cross_validate(tx, noisy, folds, 5)["l2"])
    assert abs(balanced_accuracy(noise.predict(sx), shuffle(sy)) - 0.2) < 0.06


def test_cross_validation_never_fits_on_the_held_out_fold_and_chooses_the_best_mean(monkeypatch):
    g = torch.Generator().manual_seed(3)
    x, y = _blobs(300, g, 2.5)  # overlapping blobs: the penalties score differently
    folds = _folds(300)
    fits = []
    real_fit = probe_module.fit_probe

    def spy(features, labels, *args, **kwargs):
        fits.append(features)
        return real_fit(features, labels, *args, **kwargs)

    monkeypatch.setattr(probe_module, "fit_probe", spy)
    cv = cross_validate(x, y, folds, 5)
    assert len(fits) == len(folds) * len(L2_GRID)
    for i, features in enumerate(fits):  # fold by fold, every penalty: fitted on the other folds only
        keep = torch.ones(300, dtype=torch.bool)
        keep[folds[i // len(L2_GRID)]] = False
        assert torch.equal(features, x[keep])
    means = {float(k): v for k, v in cv["cv_by_l2"].items()}
    assert set(means) == set(L2_GRID)
    for k, scores in cv["cv_by_l2_per_fold"].items():
        assert len(scores) == len(folds) and means[float(k)] == pytest.approx(sum(scores) / len(scores))
    assert cv["l2"] == choose_l2(means) and cv["cv_balanced_accuracy"] == max(means.values())
    assert all(means[cv["l2"]] > v or l2 <= cv["l2"] for l2, v in means.items())  # ties: the stronger penalty
    assert choose_l2({0.1: 0.5, 1.0: 0.5, 10.0: 0.4}) == 1.0


def test_final_probe_is_fitted_on_all_training_items_and_test_chooses_nothing(monkeypatch):
    g = torch.Generator().manual_seed(4)
    (tx, ty), (sx, sy) = (_blobs(n, g, 2.0) for n in (200, 100))
    task = TaskData("patch", {"training": TaskSplit(tx, ty), "test": TaskSplit(sx, sy)}, folds=_folds(200))
    final = []
    real_fit = run_module.fit_probe

    def spy(features, labels, num_classes, l2, *args, **kwargs):
        final.append((features, labels, l2))
        return real_fit(features, labels, num_classes, l2, *args, **kwargs)

    monkeypatch.setattr(run_module, "fit_probe", spy)
    scores = probe_scores({"training": tx, "test": sx}, task)
    assert len(final) == 1 and torch.equal(final[0][0], tx) and torch.equal(final[0][1], ty)
    assert final[0][2] == scores["l2"] and scores["training_examples"] == 200 and scores["test_examples"] == 100
    # Other test features and labels change the test score only, never the choice.
    task.splits["test"] = TaskSplit(sx.flip(0), sy.flip(0))
    other = probe_scores({"training": tx, "test": -sx}, task)
    assert {k: v for k, v in other.items() if k != "test_balanced_accuracy"} == \
        {k: v for k, v in scores.items() if k != "test_balanced_accuracy"}


def test_balanced_accuracy_weighs_every_class_the_same():
    labels = torch.tensor([0] * 90 + [1] * 10)
    assert balanced_accuracy(torch.zeros(100, dtype=torch.long), labels) == pytest.approx(0.5)


def _raw_task(split) -> TaskData:
    """A patch-like task of 200 training items (on z rows of 5) and 50 test items, with its CV folds."""
    training, test = split(200), split(50)
    training.centre_mm = torch.zeros(200, 3, dtype=torch.float64)
    training.centre_mm[:, 2] = 2.0 * (torch.arange(200) // 5).double()
    return attach_folds(TaskData("patch", {"training": training, "test": test}), 4, "z-slabs")


def _bright_octant_cubes(n: int, side: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, 1, side^3)`` noise cubes whose label (0..4) says which octant is bright, and the labels."""
    labels = torch.arange(n) % 5
    x = 0.3 * torch.randn(n, 1, side, side, side, generator=g)
    h = side // 2
    for i, c in enumerate(labels.tolist()):
        a, b, d = (c >> 2) & 1, (c >> 1) & 1, c & 1
        x[i, 0, h * a:h * a + h, h * b:h * b + h, h * d:h * d + h] += 1.0
    return x, labels


def test_raw_baseline_chooses_its_pooling_by_cross_validation():
    """Labels in which octant is bright: invisible to one mean (g=1), plain at g=2 (and at g=4)."""
    g = torch.Generator().manual_seed(1)
    task = _raw_task(lambda n: TaskSplit(*_bright_octant_cubes(n, 16, g)))
    raw = raw_scores(task, PATCH)
    assert raw["pooling"] == 2 and raw["features"] == 8
    assert raw["cv_by_pooling"]["1"] < 0.5 < raw["cv_by_pooling"]["2"]
    assert raw["cv_balanced_accuracy"] == max(raw["cv_by_pooling"].values()) == max(raw["cv_by_l2"].values())
    assert raw["test_balanced_accuracy"] > 0.9 and raw["training_examples"] == 200


def test_raw_baseline_pools_the_whole_wide_cube():
    """N=32 cubes whose label shows only outside the central 16^3: the baseline must see it."""
    g = torch.Generator().manual_seed(2)

    def split(n: int) -> TaskSplit:
        x, labels = _bright_octant_cubes(n, 32, g)
        x[:, :, 8:24, 8:24, 8:24] = 0.3 * torch.randn(n, 1, 16, 16, 16, generator=g)  # centre: noise only
        return TaskSplit(x, labels)

    raw = raw_scores(_raw_task(split), PATCH)
    assert raw["pooling"] in (2, 4) and raw["test_balanced_accuracy"] > 0.9


def test_random_inits_share_the_teachers_architecture_and_differ_by_seed():
    teacher = build_model("vit_tiny_3d", patch_size=8, img_size=32)
    a, b, a_again = (random_backbone(TINY_SPEC, s) for s in (0, 1, 0))
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in teacher.state_dict().items()}
    assert torch.equal(a.pos_embed, a_again.pos_embed) and not torch.equal(a.pos_embed, b.pos_embed)


# ------------------------------------------------------------------------------ command line
def test_cli_end_to_end_warns_when_the_evaluation_data_was_pretrained_on(tmp_path, capsys):
    datalist = tmp_path / "pretrain.json"
    datalist.write_text(json.dumps([{"image": str(held_out_files()[0])}]))
    teacher = tiny_teacher(tmp_path / "run" / "teacher_checkpoint.pth", datalist=str(datalist))
    assert main(["--teacher", str(teacher), "--random-seeds", "2", "--patch-size", "24"]) == 0
    out = capsys.readouterr().out
    assert "patch_size 24: patch: 48 mm cube (24^3 voxels)" in out
    assert "trained on all of the right hemisphere, L2 chosen by 4-fold cross-validation over 48 mm blocks" in out
    assert any(line.startswith("WARNING:") and "not evidence" in line for line in out.splitlines())
    evidence = json.loads((tmp_path / "run" / "evidence" / "evidence.json").read_text())
    assert evidence["evaluation_data_in_pretraining"] is True
    assert evidence["patch_size"] == 24 and evidence["tasks"]["patch"]["description"]["input_voxels"] == 24
    assert evidence["pretraining_overlap"][0]["held_out_in_datalist"] == [str(held_out_files()[0])]
    markdown = (tmp_path / "run" / "evidence" / "evidence.md").read_text()
    assert markdown.startswith("| task |") and "WARNING:" in markdown
    assert "| patch: 48 mm cube (24^3 voxels)" in markdown and "patch_size 24" in markdown
    assert "4-fold cross-validation" in markdown and "validation band" not in markdown
    assert evidence["cv_folds"] == 4 and evidence["last_blocks"] == [1, 4]
    assert (evidence["cv_grouping"], evidence["cv_block_mm"], evidence["cv_buffer"]) == ("blocks", 48.0, False)
    assert list(evidence["tasks"]) == ["patch", "patch_last4", "dense", "dense_last4"]
    assert "patch_last4: CLS + mean patch token, last 4 blocks concatenated" in out
    assert "| patch: 48 mm cube (24^3 voxels) -> lobe at its centre [CLS + mean patch token, last 4 blocks" in markdown
    for name in ("patch", "dense"):
        one, four = evidence["tasks"][name], evidence["tasks"][f"{name}_last4"]
        assert (one["blocks"], four["blocks"]) == (1, 4) and one["raw"] == four["raw"]
        assert one["teacher"]["mean"] != four["teacher"]["mean"]
    for name in ("patch", "dense", "patch_last4", "dense_last4"):
        task = evidence["tasks"][name]
        seeds = [r["test_balanced_accuracy"] for r in task["random_init"]["per_seed"]]
        assert [r["seed"] for r in task["random_init"]["per_seed"]] == [0, 1]
        assert task["random_init"]["std"] > 0 and max(seeds) > min(seeds)
        assert task["chance"] == pytest.approx(0.2)
        assert 0.2 < task["teacher"]["mean"] <= 1 and task["raw"]["pooling"] in (1, 2, 4)
        assert task["margins"]["teacher_minus_raw"] == pytest.approx(
            task["teacher"]["mean"] - task["raw"]["test_balanced_accuracy"])
        assert re.search(rf"^{name} +teacher - random", out, re.M)
        description = task["description"]
        assert len(description["cv"]["by_fold"]) == 4 and set(description["class_counts"]) == {"training", "test"}
        assert all(min(fold["class_counts"]) > 0 for fold in description["cv"]["by_fold"])  # every lobe in every fold
        for result in [*task["teacher"]["per_seed"], *task["random_init"]["per_seed"], task["raw"]]:
            means = result["cv_by_l2"]
            assert len(means) == 5 and means[f"{result['l2']:g}"] == max(means.values())
            assert result["training_examples"] == description["examples"]["training"] == \
                sum(description["class_counts"]["training"])
            assert result["test_examples"] == description["examples"]["test"]


def test_cli_refuses_fewer_than_two_folds(tmp_path, capsys):
    assert main(["--teacher", str(tmp_path / "t.pth"), "--cv-folds", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR:") and "--cv-folds" in err[0], err


def test_cli_passes_the_cross_validation_options_and_refuses_a_bad_block_side(tmp_path, capsys, monkeypatch):
    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise EvidenceError("recorded")

    monkeypatch.setattr("dinov2.eval.evidence.__main__.run_evidence", record)
    assert main(["--teacher", "t.pth", "--cv-grouping", "z-slabs", "--cv-block-mm", "32", "--cv-buffer"]) == 1
    assert (seen["cv_grouping"], seen["cv_block_mm"], seen["cv_buffer"]) == ("z-slabs", 32.0, True)
    assert main(["--teacher", "t.pth"]) == 1
    assert (seen["cv_grouping"], seen["cv_block_mm"], seen["cv_buffer"]) == ("blocks", 48.0, False)
    capsys.readouterr()
    monkeypatch.undo()
    teacher = tiny_teacher(tmp_path / "t.pth")
    assert main(["--teacher", str(teacher), "--cv-block-mm", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR:") and "--cv-block-mm" in err[0], err


def tiny_segmentation_model(path: Path) -> Path:
    torch.manual_seed(0)
    kwargs = {"embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 8, "img_size": 16}
    model = build_segmentation_model(build_model("vit_tiny_3d", **kwargs), "UNETR", 1, 2, {"feature_size": 4})
    preset = DatasetPreset.from_config(dict(load_preset("brain_tissue")))
    return save_finetuned(path, model, {"arch": "vit_tiny_3d", "kwargs": kwargs}, {"model": {}}, preset, 1,
                          {"name": "dice", "value": 0.5})


@pytest.mark.parametrize("case", ["missing", "segmentation", "window", "patch_not_multiple", "patch_too_small"])
def test_cli_user_errors_are_one_error_line(case, tmp_path, capsys):
    if case == "missing":
        path, extra, says = tmp_path / "nope.pth", [], "not found"
    elif case == "segmentation":
        path, extra, says = tiny_segmentation_model(tmp_path / "best_model.pth"), [], "finetuned segmentation"
    elif case == "window":
        path, extra, says = tiny_teacher(tmp_path / "t.pth"), ["--dense-window", "20"], "multiple of 8"
    elif case == "patch_not_multiple":
        path, extra, says = tiny_teacher(tmp_path / "t.pth"), ["--patch-size", "20"], "e.g. --patch-size 24"
    else:
        path, extra, says = tiny_teacher(tmp_path / "t.pth"), ["--patch-size", "8"], "e.g. --patch-size 16"
    assert main(["--teacher", str(path), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR:") and str(path) in err[0] and says in err[0], err


def test_cli_process_refuses_a_garbage_file_without_traceback(tmp_path):
    garbage = tmp_path / "teacher_checkpoint.pth"
    garbage.write_text("not a checkpoint\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "dinov2.eval.evidence", "--teacher", str(garbage)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and errors[0].startswith("ERROR:") and str(garbage) in errors[0], done.stderr
    assert "not a PyTorch checkpoint" in errors[0] and "--pretrained-weights" not in errors[0]
