"""DataAugmentationDINO3d and its building blocks (crop geometry, resampling, intensity ops)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from monai import transforms as mt
from omegaconf import OmegaConf
from scipy import ndimage

from dinov2.data import augmentations as A
from dinov2.data.augmentations import DataAugmentationDINO3d
from dinov2.data.crops import (
    ROTATION_PLANES,
    Orientation,
    resized_crop,
    sample_crop_size,
    sample_crop_start,
    sample_orientation,
)
from dinov2.data.transforms import load_data_defaults

pytestmark = pytest.mark.usefixtures("one_thread")


NO_INTENSITY = dict(intensity_prob=0.0, global1_blur_prob=0.0, global2_blur_prob=0.0, global2_gibbs_prob=0.0, local_blur_prob=0.0)


def coordinate_volume(shape):
    """(3, X, Y, Z): channel c holds each voxel's index along axis c."""
    grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
    return torch.stack(grids)


# -- output contract ------------------------------------------------------------------------------


def test_output_structure_shapes_and_types():
    aug = DataAugmentationDINO3d(global_crops_size=16, local_crops_size=8, local_crops_number=3, seed=1)
    volume = torch.rand(1, 30, 28, 20)
    before = volume.clone()
    out = aug(volume)
    assert set(out) == {"global_crops", "local_crops"}
    assert [tuple(c.shape) for c in out["global_crops"]] == [(1, 16, 16, 16)] * 2
    assert [tuple(c.shape) for c in out["local_crops"]] == [(1, 8, 8, 8)] * 3
    for crop in out["global_crops"] + out["local_crops"]:
        assert type(crop) is torch.Tensor and crop.dtype == torch.float32 and crop.is_contiguous()
        assert torch.isfinite(crop).all()
    assert torch.equal(volume, before), "the (cached) input volume must never be modified"


def test_runs_single_threaded_and_restores_the_thread_count():
    volume = torch.rand(1, 20, 20, 16)
    reference = DataAugmentationDINO3d(global_crops_size=8, local_crops_size=4, local_crops_number=1, seed=4)(volume)
    torch.set_num_threads(2)  # the autouse fixture restores the original count afterwards
    out = DataAugmentationDINO3d(global_crops_size=8, local_crops_size=4, local_crops_number=1, seed=4)(volume)
    assert torch.get_num_threads() == 2
    assert all(torch.equal(a, b) for a, b in zip(out["global_crops"], reference["global_crops"]))


def test_float16_storage_gives_float32_crops():
    aug = DataAugmentationDINO3d(global_crops_size=8, local_crops_size=4, local_crops_number=1)
    out = aug(torch.rand(1, 12, 12, 10).half())
    assert all(c.dtype == torch.float32 for c in out["global_crops"] + out["local_crops"])


def test_same_seed_same_crops_and_reseed_restarts_the_stream():
    volume = torch.rand(1, 24, 24, 18)
    kwargs = dict(global_crops_size=8, local_crops_size=4, local_crops_number=2)
    a, b, c = (DataAugmentationDINO3d(**kwargs, seed=s) for s in (5, 5, 6))
    crops = lambda out: out["global_crops"] + out["local_crops"]  # noqa: E731
    first = crops(a(volume))
    assert all(torch.equal(x, y) for x, y in zip(first, crops(b(volume))))
    assert not any(torch.equal(x, y) for x, y in zip(first, crops(c(volume))))
    assert not torch.equal(first[0], crops(a(volume))[0]), "successive samples must differ"
    a.reseed(5)
    assert all(torch.equal(x, y) for x, y in zip(first, crops(a(volume))))


# -- geometry ---------------------------------------------------------------------------------


def test_crops_lie_inside_the_volume():
    shape = (30, 26, 20)
    aug = DataAugmentationDINO3d(global_crops_size=12, local_crops_size=6, local_crops_number=4, **NO_INTENSITY, seed=3)
    coords = coordinate_volume(shape)
    for _ in range(20):
        out = aug(coords)
        for crop in out["global_crops"] + out["local_crops"]:
            for c, n in enumerate(shape):
                assert crop[c].min() >= 0 and crop[c].max() <= n - 1


def test_region_holds_every_crop_of_a_sample():
    """With a region, all crops of one sample come from one sub-volume of the given fractions."""
    shape = (60, 60, 40)
    aug = DataAugmentationDINO3d(global_crops_size=8, local_crops_size=4, local_crops_number=4, **NO_INTENSITY,
                                 flip_prob=0.0, rotate90_prob=0.0, region_scale=(0.25, 0.25),
                                 region_depth_scale=(0.5, 0.5), aspect_ratio=(1.0, 1.0), seed=5)
    coords = coordinate_volume(shape)
    starts = set()
    for _ in range(20):
        out = aug(coords)
        crops = out["global_crops"] + out["local_crops"]
        low = [min(float(c[a].min()) for c in crops) for a in range(3)]
        high = [max(float(c[a].max()) for c in crops) for a in range(3)]
        # region: 30 x 30 in-plane (a quarter of the area), 20 through-plane
        assert [h - lo for lo, h in zip(low, high)] <= [29.0, 29.0, 19.0]
        starts.add(tuple(round(v) for v in low))
    assert len(starts) > 5  # the region moves from sample to sample
    plain = DataAugmentationDINO3d(global_crops_size=8, local_crops_size=4, local_crops_number=4, **NO_INTENSITY,
                                   seed=5)
    spans = []
    for _ in range(20):
        crops = sum(plain(coords).values(), [])
        spans.append(max(float(c[0].max()) for c in crops) - min(float(c[0].min()) for c in crops))
    assert max(spans) > 29.0  # without a region the crops of a sample spread wider


def test_region_scales_must_come_together():
    with pytest.raises(ValueError, match="region_scale and region_depth_scale"):
        DataAugmentationDINO3d(region_scale=(0.3, 0.5))


def test_resized_crop_reads_exactly_its_box_and_matches_monai():
    torch.manual_seed(0)
    volume = torch.rand(2, 23, 19, 17)
    start, size = (3, 2, 5), (15, 11, 9)
    ours = resized_crop(volume, start, size, 10)
    box = mt.SpatialCrop(roi_start=start, roi_end=[s + n for s, n in zip(start, size)])(volume)
    reference = mt.Resize((10, 10, 10), mode="trilinear")(box).as_tensor()
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    # Coordinates prove the box: values span exactly the box, up to the edge-sample offset.
    coords = resized_crop(coordinate_volume((23, 19, 17)), start, size, 10)
    for c in range(3):
        assert start[c] <= coords[c].min() < start[c] + 1
        assert start[c] + size[c] - 2 < coords[c].max() <= start[c] + size[c] - 1
    # float16 storage is read the same way.
    torch.testing.assert_close(resized_crop(volume.half(), start, size, 10), resized_crop(volume.half().float(), start, size, 10))


def _compose_with_torch(x, flips, rotations):
    """The reference chain: torch.flip per axis, then torch.rot90 per plane (MONAI's ops)."""
    for axis in flips:
        x = torch.flip(x, [1 + axis])
    for k, (a, b) in rotations:
        x = torch.rot90(x, k, (1 + a, 1 + b))
    return x


def test_orientation_composition_equals_torch_flip_and_rot90_chain():
    x = torch.rand(2, 5, 5, 5)
    rng = np.random.default_rng(0)
    for _ in range(60):
        flips = [a for a in range(3) if rng.random() < 0.5]
        rotations = [(int(rng.integers(1, 4)), p) for p in ROTATION_PLANES if rng.random() < 0.6]
        orientation = Orientation()
        for a in flips:
            orientation = orientation.flip(a)
        for k, plane in rotations:
            orientation = orientation.rot90(k, plane)
        assert torch.equal(orientation.apply(x), _compose_with_torch(x, flips, rotations))


def test_fused_orientation_equals_resize_then_orient():
    torch.manual_seed(1)
    volume = torch.rand(1, 20, 18, 15)
    for axes, flipped in [((1, 0, 2), (0,)), ((2, 0, 1), (1, 2)), ((0, 1, 2), (0, 1, 2)), ((2, 1, 0), ())]:
        o = Orientation(axes, flipped)
        fused = resized_crop(volume, (1, 2, 3), (17, 13, 11), 9, o)
        separate = o.apply(resized_crop(volume, (1, 2, 3), (17, 13, 11), 9)).contiguous()
        torch.testing.assert_close(fused, separate, atol=1e-6, rtol=0)
        assert fused.is_contiguous()


def test_orientation_distribution_honours_flip_and_rotation_probabilities():
    # Exact distribution of the composed orientation, enumerated with torch's own ops.
    p_flip, p_rot, draws = 0.3, 0.3, 8000
    probe = torch.arange(64.0).reshape(1, 4, 4, 4)  # unique values: every symmetry is visible
    expected: dict[bytes, float] = {}
    for flip_set in itertools.product([False, True], repeat=3):
        p = math.prod(p_flip if f else 1 - p_flip for f in flip_set)
        for ks in itertools.product(range(4), repeat=3):
            q = p * math.prod(p_rot / 3 if k else 1 - p_rot for k in ks)
            rotations = [(k, plane) for k, plane in zip(ks, ROTATION_PLANES) if k]
            key = _compose_with_torch(probe, [a for a in range(3) if flip_set[a]], rotations).numpy().tobytes()
            expected[key] = expected.get(key, 0.0) + q
    rng = np.random.default_rng(0)
    counts: dict[bytes, int] = {}
    for _ in range(draws):
        key = sample_orientation(rng, p_flip, p_rot).apply(probe).contiguous().numpy().tobytes()
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(expected)
    for key, p in expected.items():
        observed = counts.get(key, 0) / draws
        assert abs(observed - p) < 4 * math.sqrt(p * (1 - p) / draws) + 2e-3, (observed, p)


def test_crop_size_honours_relative_scales():
    rng = np.random.default_rng(0)
    shape = (80, 80, 50)
    for area, depth in [((0.48, 1.0), (0.5, 1.0)), ((0.16, 0.48), (0.2, 0.5))]:
        sizes = np.array([sample_crop_size(rng, shape, area, (0.9, 1 / 0.9), depth) for _ in range(4000)])
        area_fraction = sizes[:, 0] * sizes[:, 1] / (shape[0] * shape[1])
        depth_fraction = sizes[:, 2] / shape[2]
        assert area_fraction.min() >= area[0] * 0.95 and area_fraction.max() <= min(1.0, area[1] * 1.05)
        assert depth_fraction.min() >= depth[0] - 0.5 / shape[2] and depth_fraction.max() <= depth[1] + 0.5 / shape[2]
        # Uniform draws: the mean sits mid-range (clipping near 1 only lowers it a little).
        assert abs(area_fraction.mean() - sum(area) / 2) < 0.03
        assert abs(depth_fraction.mean() - sum(depth) / 2) < 0.02
        ratio = sizes[:, 0] / sizes[:, 1]
        assert ratio.min() > 0.85 and ratio.max() < 1 / 0.85


def test_crop_start_is_uniform_over_valid_positions():
    rng = np.random.default_rng(1)
    starts = np.array([sample_crop_start(rng, (10, 12, 7), (7, 12, 3)) for _ in range(4000)])
    assert starts[:, 0].min() == 0 and starts[:, 0].max() == 3
    assert (starts[:, 1] == 0).all()
    assert np.allclose(np.bincount(starts[:, 2], minlength=5) / 4000, 0.2, atol=0.03)


def test_augmentation_crop_extents_follow_the_configured_scales():
    # Output cubes at least as large as any box: the coordinates then span the box exactly.
    shape = (40, 40, 30)
    aug = DataAugmentationDINO3d(global_crops_size=40, local_crops_size=40, local_crops_number=2, **NO_INTENSITY, seed=2)
    coords = coordinate_volume(shape)
    extents = {"global_crops": [], "local_crops": []}
    for _ in range(120):
        out = aug(coords)
        for kind in extents:
            for crop in out[kind]:
                flat = crop.reshape(3, -1)
                extents[kind].append((flat.max(1).values - flat.min(1).values + 1).round().tolist())
    g, l = np.array(extents["global_crops"]), np.array(extents["local_crops"])
    g_area, l_area = g[:, 0] * g[:, 1] / 1600, l[:, 0] * l[:, 1] / 1600
    assert g_area.min() >= 0.48 * 0.93 and g_area.max() <= 1.0
    assert l_area.min() >= 0.16 * 0.9 and l_area.max() <= 0.48 * 1.07
    assert abs(g_area.mean() - 0.74) < 0.04 and abs(l_area.mean() - 0.32) < 0.03
    assert g[:, 2].min() >= 15 and g[:, 2].max() <= 30  # depth scale [0.5, 1] of 30 voxels
    assert l[:, 2].min() >= 6 and l[:, 2].max() <= 15  # depth scale [0.2, 0.5]


# -- intensity ops ----------------------------------------------------------------------------


def test_contrast_matches_monai_adjust_contrast():
    x = torch.rand(1, 6, 7, 8) * 3 - 1
    for gamma in (0.5, 1.0, 1.7):
        reference = mt.AdjustContrast(gamma)(x.clone()).as_tensor()
        torch.testing.assert_close(A.adjust_contrast_(x.clone(), gamma), reference, atol=1e-5, rtol=1e-5)


def test_histogram_shift_matches_piecewise_linear_interpolation():
    x = torch.rand(1, 9, 8, 7) * 2 - 1
    out = A.histogram_shift_(x.clone(), np.random.default_rng(3).random(8))
    low, high = float(x.min()), float(x.max())
    rng = np.random.default_rng(3)
    moved = np.linspace(low, high, 10)
    for i in range(1, 9):
        moved[i] = rng.uniform(moved[i - 1], moved[i + 1])
    reference = np.interp(x.numpy().astype(np.float64), np.linspace(low, high, 10), moved)
    np.testing.assert_allclose(out.numpy(), reference, atol=1e-5)
    assert not np.allclose(moved, np.linspace(low, high, 10))


def test_gaussian_noise_has_the_requested_std():
    x = torch.zeros(1, 30, 30, 30)
    out = A.add_gaussian_noise_(x, 0.07, torch.Generator().manual_seed(0))
    assert abs(float(out.std()) - 0.07) < 0.003 and abs(float(out.mean())) < 0.003


def test_gaussian_blur_is_a_separable_replicate_padded_gaussian():
    x = torch.rand(1, 12, 10, 9)
    sigma = (0.4, 1.0, 1.5)
    ours = A.gaussian_blur(x, sigma)
    reference = x[0].numpy().astype(np.float64)
    for axis, s in enumerate(sigma):
        reference = ndimage.correlate1d(reference, A.gaussian_kernel1d(s).double().numpy(), axis=axis, mode="nearest")
    np.testing.assert_allclose(ours[0].numpy(), reference, atol=1e-5)
    constant = torch.full((1, 6, 6, 6), 0.3)
    torch.testing.assert_close(A.gaussian_blur(constant, sigma), constant)


def test_sharpen_and_gibbs_behave():
    torch.manual_seed(0)
    smooth = A.gaussian_blur(torch.rand(1, 16, 16, 16), (2.0, 2.0, 2.0))
    sharp = A.gaussian_sharpen(smooth, (0.5,) * 3, (1.0,) * 3, 20.0)
    detail = lambda v: float((v[..., 1:] - v[..., :-1]).abs().mean())  # noqa: E731
    assert detail(sharp) > 2 * detail(smooth)
    ringing = A.gibbs_ringing(smooth, 0.8)
    assert ringing.shape == smooth.shape and ringing.dtype == torch.float32
    assert abs(float(ringing.mean() - smooth.mean())) < 1e-4  # the mean (DC) is kept
    assert float((ringing - smooth).abs().mean()) > 5 * float((A.gibbs_ringing(smooth, 0.0) - smooth).abs().mean())


def test_intensity_and_blur_probabilities(monkeypatch):
    calls = {name: [] for name in ("adjust_contrast_", "add_gaussian_noise_", "histogram_shift_", "gaussian_blur", "gaussian_sharpen", "gibbs_ringing")}
    for name in calls:
        original = getattr(A, name)

        def wrapper(x, *args, _name=name, _original=original, **kwargs):
            calls[_name].append(x.shape[-1])
            return _original(x, *args, **kwargs)

        monkeypatch.setattr(A, name, wrapper)
    g, l, n_local, n = 6, 4, 2, 800
    aug = DataAugmentationDINO3d(global_crops_size=g, local_crops_size=l, local_crops_number=n_local, seed=0)
    volume = torch.rand(1, 10, 10, 8)
    for _ in range(n):
        aug(volume)
    count = lambda name, size: sum(1 for s in calls[name] if s == size)  # noqa: E731
    intensity = ("adjust_contrast_", "add_gaussian_noise_", "histogram_shift_")
    for size, crops in ((g, 2 * n), (l, n_local * n)):
        total = sum(count(name, size) for name in intensity)
        assert abs(total / crops - 0.8) < 0.04
        for name in intensity:
            assert abs(count(name, size) / crops - 0.8 / 3) < 0.045
    sharpen = count("gaussian_sharpen", g)
    blur_global = count("gaussian_blur", g) - 2 * sharpen  # a sharpening blurs twice internally
    # Tolerances are about 4 binomial standard deviations.
    assert abs((sharpen + blur_global) / n - 1.1) < 0.045  # crop 1 always, crop 2 with p = 0.1
    assert abs(sharpen / (sharpen + blur_global) - 0.5) < 0.07
    assert abs(count("gibbs_ringing", g) / n - 0.2) < 0.055
    assert abs(count("gaussian_blur", l) / (n_local * n) - 0.5) < 0.05
    assert count("gaussian_sharpen", l) == 0 and count("gibbs_ringing", l) == 0


# -- configuration ----------------------------------------------------------------------------


def test_yaml_defaults_equal_constructor_defaults():
    from_yaml = DataAugmentationDINO3d.from_config({})
    plain = DataAugmentationDINO3d()
    public = lambda a: {k: v for k, v in vars(a).items() if k not in ("rng", "torch_generator")}  # noqa: E731
    assert set(load_data_defaults()["crops"]) == set(public(plain))
    for key, value in public(plain).items():
        if value is None:  # optional settings that are off by default
            assert public(from_yaml)[key] is None, key
            continue
        assert np.allclose(public(from_yaml)[key], value), key


def test_from_config_overrides_and_rejects_unknown_keys():
    crops = OmegaConf.create({"local_crops_number": 3, "local_crops_scale": [0.1, 0.3]})  # as in the training config
    aug = DataAugmentationDINO3d.from_config(crops)
    assert aug.local_crops_number == 3 and aug.local_crops_scale == (0.1, 0.3)
    with pytest.raises(ValueError, match="local_crop_number"):
        DataAugmentationDINO3d.from_config({"local_crop_number": 3})


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(flip_prob=1.5),
        dict(global_crops_scale=(0.5, 1.2)),
        dict(local_crops_scale=(0.0, 0.3)),
        dict(aspect_ratio=(1.2, 0.9)),
        dict(global_crops_size=0),
        dict(local_crops_number=-1),
        dict(histogram_shift_points=2),
        dict(gibbs_alpha=(0.0, 1.5)),
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        DataAugmentationDINO3d(**kwargs)


# -- the benchmark's equivalence check ----------------------------------------------------------


def test_fast_pipeline_and_naive_monai_reference_give_the_same_crop_distribution():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_data.py"
    spec = importlib.util.spec_from_file_location("benchmark_data", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    quick = dict(global_crops_size=12, local_crops_size=8, local_crops_number=1)  # MONAI is slow per crop
    rows = benchmark.compare_crop_distributions((36, 36, 28), samples=30, seed=0, settings=quick)
    assert len(rows) == 14  # 5 KS, 1 Fisher, 1 chi-square test, for global and for local crops
    assert min(r["p"] for r in rows) > 1e-3, rows
    # ... and it has power: a different depth scale or no rotations are detected.
    changed = benchmark.compare_crop_distributions(
        (36, 36, 28), samples=30, seed=0, settings=quick,
        ours_overrides={"global_crops_depth_scale": (0.2, 0.6), "rotate90_prob": 0.0},
    )
    p = {(r["crops"], r["quantity"].split(" (")[0]): r["p"] for r in changed}
    assert p[("global_crops", "through-plane length fraction")] < 1e-3
    assert p[("global_crops", "share with permuted axes")] < 1e-3 and p[("local_crops", "share with permuted axes")] < 1e-3
