"""``crops.augment_on_device``: boxes cut by the loader, crops made batched on the training device.

The batched path must apply the very draws of the per-sample pipeline (equal crops, to float
rounding, and the same distributions), depend on nothing but the sample's stream position, and
reach the model through the loader's collate, workers included.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import Dataset

from dinov2.data.augment_draws import draw_sample
from dinov2.data.augmentations import DataAugmentationDINO3d
from dinov2.data.collate import CollateDataAndCast, collate_data_and_cast
from dinov2.data.crop_boxes import CROP_BOXES_KEY, collate_crop_boxes
from dinov2.data.device_augment import add_noise_batch_, make_crops
from dinov2.data.loader import build_train_loader, sample_seeds
from dinov2.data.seeding import child_sequence

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(global_crops_size=16, local_crops_size=8, local_crops_number=3)
# Every random op likely, so that a batch exercises all of them; no noise, whose fields the two
# paths draw from different generators.
EVERY_OP = dict(intensity_prob=1.0, global2_blur_prob=0.6, global2_gibbs_prob=0.6, local_blur_prob=0.6,
                flip_prob=0.5, rotate90_prob=0.5, noise_std=0.0)


def smooth_volume(shape, seed=0) -> torch.Tensor:
    """``(1, X, Y, Z)`` smooth random intensities in about [-1, 1], like a preprocessed scan."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand((1, 1, *shape), generator=generator) * 2 - 1
    return torch.nn.functional.avg_pool3d(noise, 3, 1, 1)[0] * 3


def coordinate_volume(shape) -> torch.Tensor:
    """(3, X, Y, Z): channel c holds each voxel's index along axis c."""
    grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
    return torch.stack(grids)


VOLUMES = [smooth_volume(s, i) for i, s in enumerate([(40, 36, 30), (34, 40, 28), (44, 38, 26)])]


def _positioned(aug: DataAugmentationDINO3d, volume: torch.Tensor, position: int, run_seed: int = 7) -> dict:
    """One sample as the loader makes it at ``position`` (the dataset's reseed, then the augmentation)."""
    aug.reseed(child_sequence(sample_seeds(run_seed, position).sequence, 1))
    return aug(volume)


def _per_sample_and_batched(settings: dict, volumes, positions, vectorised: bool):
    """The per-sample pipeline's crops and the batched path's, for the same stream positions."""
    reference = DataAugmentationDINO3d(**settings)
    cutter = DataAugmentationDINO3d(**settings, augment_on_device=True)
    expected = [_positioned(reference, v, p) for v, p in zip(volumes, positions)]
    batch = collate_crop_boxes([_positioned(cutter, v, p) for v, p in zip(volumes, positions)])
    global_crops, local_crops = make_crops(batch, "cpu", vectorised=vectorised)
    return expected, global_crops, local_crops


def _assert_crop_major(expected, global_crops, local_crops, **tolerance):
    b = len(expected)
    for key, crops in (("global_crops", global_crops), ("local_crops", local_crops)):
        assert crops.shape[0] == b * len(expected[0][key]) and crops.dtype == torch.float32
        for i in range(len(expected[0][key])):
            for s in range(b):
                torch.testing.assert_close(crops[i * b + s], expected[s][key][i], **tolerance)


# -- the same draws applied both ways -------------------------------------------------------------


REGION = dict(region_scale=(0.4, 0.7), region_depth_scale=(0.5, 0.9))


@pytest.mark.parametrize("extra", [{}, EVERY_OP, dict(EVERY_OP, **REGION)])
def test_cpu_path_equals_the_per_sample_pipeline_bit_for_bit(extra):
    expected, g, l = _per_sample_and_batched({**SMALL, "noise_std": 0.0, **extra}, VOLUMES, [3, 4, 5], False)
    _assert_crop_major(expected, g, l, atol=0, rtol=0)


@pytest.mark.parametrize("storage", [torch.float32, torch.float16])
def test_vectorised_path_equals_the_per_sample_pipeline_to_float_rounding(storage):
    volumes = [v.to(storage) for v in VOLUMES]
    for first in range(0, 12, 3):  # 4 batches: every op drawn several times
        expected, g, l = _per_sample_and_batched({**SMALL, **EVERY_OP}, volumes, range(first, first + 3), True)
        # Sharpening multiplies rounding differences by up to 1 + alpha = 31.
        _assert_crop_major(expected, g, l, atol=2e-4, rtol=1e-4)


def test_vectorised_geometry_is_the_box_with_its_flips_and_rotations():
    # Coordinates in, coordinates out: a wrong axis, direction or box edge shows as a wrong value.
    settings = dict(SMALL, intensity_prob=0.0, global1_blur_prob=0.0, global2_blur_prob=0.0, global2_gibbs_prob=0.0,
                    local_blur_prob=0.0, flip_prob=0.5, rotate90_prob=0.5)
    volumes = [coordinate_volume((40, 36, 30)), coordinate_volume((30, 42, 24))]
    for first in range(0, 20, 2):
        expected, g, l = _per_sample_and_batched(settings, volumes, [first, first + 1], True)
        _assert_crop_major(expected, g, l, atol=1e-4, rtol=0)


def test_noise_fields_have_the_drawn_std_and_depend_on_their_seed_only():
    x = torch.zeros(3, 1, 20, 20, 20)
    out = add_noise_batch_(x, torch.tensor([0.01, 0.1, 0.1]), [5, 6, 5])
    assert abs(float(out[0].std()) - 0.01) < 0.001 and abs(float(out[1].std()) - 0.1) < 0.01
    torch.testing.assert_close(out[2], out[0] * 10)  # same seed: the same field, scaled
    assert not torch.allclose(out[1], out[2])


# -- determinism -------------------------------------------------------------------------------


@pytest.mark.parametrize("vectorised", [False, True])
def test_a_crop_depends_on_its_stream_position_only_whatever_the_batch(vectorised):
    cutter = DataAugmentationDINO3d(**SMALL, global2_gibbs_prob=1.0, intensity_prob=1.0, augment_on_device=True)
    make = lambda positions: make_crops(collate_crop_boxes(  # noqa: E731
        [_positioned(cutter, VOLUMES[p % 3], p) for p in positions]), "cpu", vectorised=vectorised)
    for p in range(6):
        first, again, other = make([p, p + 1, p + 2]), make([p, p + 1, p + 2]), make([p + 7, p + 2])
        for crops, repeated, moved in zip(first, again, other):  # global, local
            assert torch.equal(crops, repeated), "same positions, same batch: the same bits (exact resume)"
            n = crops.shape[0] // 3
            for i in range(n):
                a, b = crops[i * 3 + 2], moved[i * 2 + 1]
                # The vectorised CPU kernels round the last bit of a value by where it falls in a
                # SIMD vector; the per-crop kernels are exact.
                if vectorised:
                    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
                else:
                    assert torch.equal(a, b)


def test_cut_samples_hold_the_per_sample_draws_and_a_box_around_every_crop():
    volume = VOLUMES[0].half()
    cutter = DataAugmentationDINO3d(**SMALL, augment_on_device=True, seed=3)
    reference = DataAugmentationDINO3d(**SMALL, seed=3)
    for _ in range(10):
        draw = draw_sample(reference, reference.rng, volume.shape[1:])
        cut = cutter(volume)[CROP_BOXES_KEY]
        assert cut.draw == draw  # the same parameters, drawn in the same order from the same generator
        assert cut.box.dtype == torch.float16 and cut.box.data_ptr() >= volume.data_ptr()  # a view, no copy
        low = tuple(min(c.start[a] for c in draw.crops()) for a in range(3))
        high = tuple(max(c.start[a] + c.size[a] for c in draw.crops()) for a in range(3))
        assert cut.origin == low and cut.box.shape[1:] == tuple(h - lo for h, lo in zip(high, low))
        assert torch.equal(cut.box, volume[:, low[0]:high[0], low[1]:high[1], low[2]:high[2]])


# -- same distributions (the statistical check of the issue) -------------------------------------


def _crop_statistics(crops: torch.Tensor) -> dict[str, np.ndarray]:
    """Per crop: intensity mean, std, 5/50/95% quantiles and high-frequency energy."""
    flat = crops.reshape(crops.shape[0], -1).double()
    q = torch.quantile(flat, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64), dim=1)
    detail = sum(crops.diff(dim=d).pow(2).mean(dim=(1, 2, 3, 4)) for d in (2, 3, 4))  # blur lowers it
    return {"mean": flat.mean(1), "std": flat.std(1), "q05": q[0], "q50": q[1], "q95": q[2], "detail": detail}


def _statistics(settings: dict, batched: bool, seeds, volume) -> dict[str, np.ndarray]:
    """Statistics of every global crop 1, global crop 2 and local crop over many samples."""
    aug = DataAugmentationDINO3d(**settings, augment_on_device=batched)
    out: dict[str, list] = {}
    seeds = list(seeds)
    for batch_seeds in (seeds[i:i + 8] for i in range(0, len(seeds), 8)):
        samples = []
        for seed in batch_seeds:
            aug.reseed(seed)
            samples.append(aug(volume))
        if batched:
            g, l = make_crops(collate_crop_boxes(samples), "cpu", vectorised=True)
            groups = {"global 1": g[:len(samples)], "global 2": g[len(samples):], "local": l}
        else:
            groups = {"global 1": torch.stack([s["global_crops"][0] for s in samples]),
                      "global 2": torch.stack([s["global_crops"][1] for s in samples]),
                      "local": torch.stack([c for s in samples for c in s["local_crops"]])}
        for group, crops in groups.items():
            for name, values in _crop_statistics(crops).items():
                out.setdefault(f"{group} {name}", []).append(values.numpy())
    return {key: np.concatenate(v) for key, v in out.items()}


def _scales(settings: dict, batched: bool, seeds, shape) -> dict[str, np.ndarray]:
    """In-plane area and through-plane length fractions of the boxes, read off coordinate crops."""
    settings = dict(settings, intensity_prob=0.0, global1_blur_prob=0.0, global2_blur_prob=0.0,
                    global2_gibbs_prob=0.0, local_blur_prob=0.0)
    aug = DataAugmentationDINO3d(**settings, augment_on_device=batched)
    coords = coordinate_volume(shape)
    extents = {"global": [], "local": []}
    for seed in seeds:
        aug.reseed(seed)
        out = aug(coords)
        if batched:
            g, l = make_crops(collate_crop_boxes([out]), "cpu", vectorised=True)
            out = {"global_crops": list(g), "local_crops": list(l)}
        for kind in extents:
            for crop in out[f"{kind}_crops"]:
                values = crop.reshape(3, -1)
                extents[kind].append((values.max(1).values - values.min(1).values + 1).tolist())
    result = {}
    for kind, rows in extents.items():
        e = np.array(rows)
        result[f"{kind} area"] = e[:, 0] * e[:, 1] / (shape[0] * shape[1])
        result[f"{kind} depth"] = e[:, 2] / shape[2]
    return result


def _p_values(a: dict, b: dict) -> dict[str, float]:
    return {key: float(stats.ks_2samp(a[key], b[key]).pvalue) for key in a}


DEFAULTS = dict(SMALL, local_crops_number=2)


def test_batched_and_per_sample_crops_have_the_same_distributions():
    # Independent seeds on each side: a two-sample test of the distributions, not of the draws.
    volume = smooth_volume((36, 36, 28), seed=11)
    per_sample = _statistics(DEFAULTS, False, range(160), volume)
    batched = _statistics(DEFAULTS, True, range(1000, 1160), volume)
    p = _p_values(per_sample, batched)
    assert min(p.values()) > 1e-3, {k: round(v, 5) for k, v in p.items() if v < 0.05}
    scale_p = _p_values(_scales(DEFAULTS, False, range(120), (40, 36, 30)),
                        _scales(DEFAULTS, True, range(1000, 1120), (40, 36, 30)))
    assert min(scale_p.values()) > 1e-3, scale_p


def test_the_distribution_check_detects_a_different_recipe():
    volume = smooth_volume((36, 36, 28), seed=11)
    per_sample = _statistics(DEFAULTS, False, range(160), volume)
    stronger_blur = _statistics(dict(DEFAULTS, blur_sigma=(1.0, 2.0)), True, range(1000, 1160), volume)
    assert _p_values(per_sample, stronger_blur)["local detail"] < 1e-3
    scale_p = _p_values(_scales(DEFAULTS, False, range(120), (40, 36, 30)),
                        _scales(dict(DEFAULTS, local_crops_depth_scale=(0.4, 0.7)), True, range(1000, 1120),
                                (40, 36, 30)))
    assert scale_p["local depth"] < 1e-3 and scale_p["global depth"] > 1e-3


# -- through the collate and the loader ----------------------------------------------------------


def test_collate_keeps_the_masks_and_hands_boxes_instead_of_crops():
    crops_aug = DataAugmentationDINO3d(**SMALL, seed=2)
    cutter = DataAugmentationDINO3d(**SMALL, augment_on_device=True, seed=2)
    settings = dict(mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5, n_tokens_per_side=(2, 2, 2))
    crops = collate_data_and_cast([crops_aug(v) for v in VOLUMES], rng=np.random.default_rng(0), **settings)
    boxes = collate_data_and_cast([cutter(v) for v in VOLUMES], rng=np.random.default_rng(0), **settings)
    assert "collated_global_crops" not in boxes and boxes[CROP_BOXES_KEY]["global"]["samples"] == 3
    for key in ("collated_masks", "mask_indices_list", "masks_weight", "n_masked_patches"):
        assert torch.equal(crops[key], boxes[key]), key
    assert crops["upperbound"] == boxes["upperbound"]


class CutVolumes(Dataset):
    """Three small volumes cut for the device, reseeded per stream position as PretrainDataset3d is."""

    def __init__(self) -> None:
        self.aug = DataAugmentationDINO3d(**SMALL, augment_on_device=True)

    def __len__(self) -> int:
        return len(VOLUMES)

    def reseed(self, seeds) -> None:
        self.aug.reseed(child_sequence(seeds.sequence, 1))

    def __getitem__(self, index: int) -> dict:
        return self.aug(VOLUMES[index])


def _loader_batches(workers: int) -> list[dict]:
    loader = build_train_loader(CutVolumes(), CollateDataAndCast((0.1, 0.5), 0.5, (2, 2, 2)), batch_size=2,
                                run_seed=3, start_position=0, rank=0, world_size=1, num_workers=workers)
    return list(itertools.islice(iter(loader), 3))


def test_a_worker_hands_the_boxes_of_the_main_process(monkeypatch):
    from dinov2.utils import cpus

    monkeypatch.setattr(cpus, "available_cpus", lambda: 8)  # build_train_loader caps workers at CPUs - 1
    for in_process, from_worker in zip(_loader_batches(0), _loader_batches(1)):
        assert torch.equal(in_process["positions"], from_worker["positions"])
        assert all(box.is_shared() for box in from_worker[CROP_BOXES_KEY]["boxes"])  # one copy, into shared memory
        assert not any(box.is_shared() for box in in_process[CROP_BOXES_KEY]["boxes"])  # views, no copy
        for a, b in zip(make_crops(in_process[CROP_BOXES_KEY], "cpu"), make_crops(from_worker[CROP_BOXES_KEY], "cpu")):
            assert torch.equal(a, b)


def test_make_crops_picks_the_per_crop_kernels_on_cpu(monkeypatch):
    from dinov2.data import device_augment

    calls = []
    monkeypatch.setattr(device_augment, "augment_group", functools.partial(
        lambda original, *a: calls.append(1) or original(*a), device_augment.augment_group))
    batch = collate_crop_boxes([DataAugmentationDINO3d(**SMALL, augment_on_device=True)(v) for v in VOLUMES])
    make_crops(batch, "cpu")
    assert not calls
    make_crops(batch, "cpu", vectorised=True)
    assert len(calls) == 2


def test_the_vectorised_path_never_reads_device_values_back_to_the_host():
    # On the meta device tensors have no values: any .item(), .tolist(), bool() or value-dependent
    # shape (a host sync on a GPU) would raise here.
    cutter = DataAugmentationDINO3d(**SMALL, intensity_prob=1.0, global2_blur_prob=1.0, global2_gibbs_prob=1.0,
                                    augment_on_device=True)
    batch = collate_crop_boxes([cutter(v) for v in VOLUMES])
    assert all(len(batch[g][f"{op}_rows"]) for g in ("global", "local") for op in ("contrast", "histogram", "blur"))
    assert len(batch["global"]["sharpen_rows"]) and len(batch["global"]["gibbs_rows"])
    for group in ("global", "local"):  # noise fields need a device generator, which meta lacks
        batch[group]["noise_rows"] = batch[group]["noise_rows"][:0]
    global_crops, local_crops = make_crops(batch, "meta", vectorised=True)
    assert global_crops.shape == (6, 1, 16, 16, 16) and local_crops.shape == (9, 1, 8, 8, 8)
    assert global_crops.device.type == "meta"
