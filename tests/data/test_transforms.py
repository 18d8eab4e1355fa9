"""Deterministic preprocessing: axis order, NaN handling, intensity scaling, foreground, cache key."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from dinov2.data.transforms import (
    ReorderAxesd,
    ReplaceNonFinited,
    build_preprocessing,
    in_plane_axis_order,
    pick_frame,
    preprocessing_cache_key,
    resolve_preprocessing_config,
)

NO_FOREGROUND = {"foreground": {"enabled": False}}
# A linear, invertible scaling: values in [0, 1000] map to v / 500 - 1.
LINEAR = {"intensity": {"mode": "ct_window", "lower": 0.0, "upper": 1000.0}}


def save_nifti(path, array, spacing=(1.0, 1.0, 1.0)):
    image = nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.diag(list(spacing) + [1.0]))
    nib.save(image, str(path))
    return str(path)


@pytest.mark.parametrize(
    "spacing, shape, expected",
    [
        ((0.7, 5.0, 0.7), (10, 10, 10), (0, 2, 1)),
        ((5.0, 0.7, 0.7), (10, 10, 10), (1, 2, 0)),
        ((0.7, 0.7, 5.0), (10, 10, 10), (0, 1, 2)),
        ((1.0, 1.0, 1.0), (182, 218, 182), (0, 2, 1)),  # equal spacing: the axis whose size differs
        ((1.0, 1.0, 1.0), (40, 30, 30), (1, 2, 0)),
        ((1.0, 1.0, 1.0), (30, 30, 30), (0, 1, 2)),  # nothing singles an axis out: keep the order
        ((3.0, 0.8, 0.85), (10, 10, 10), (1, 2, 0)),  # all differ: the two closest are in-plane
        ((0.9375, 0.93750001, 3.0), (5, 6, 7), (0, 1, 2)),
    ],
)
def test_in_plane_axis_order(spacing, shape, expected):
    assert in_plane_axis_order(spacing, shape) == expected


def test_reorder_moves_the_through_plane_axis_last_with_its_affine(tmp_path):
    data = np.random.default_rng(0).uniform(0, 1000, size=(6, 4, 8)).astype(np.float32)
    path = save_nifti(tmp_path / "aniso.nii.gz", data, spacing=(0.7, 5.0, 0.7))
    record = build_preprocessing({**LINEAR, **NO_FOREGROUND})({"image": path})
    assert tuple(record["image"].shape) == (1, 6, 8, 4)
    assert record["spacing"] == pytest.approx([0.7, 0.7, 5.0])
    expected = torch.from_numpy(data).permute(0, 2, 1) / 500 - 1
    torch.testing.assert_close(record["image"][0], expected, atol=1e-5, rtol=1e-5)
    # The affine follows the data: voxel (i, j, k) of the output is voxel (i, k, j) of the input.
    affine = torch.tensor([[0.0, 0.0, 0.7, 10.0], [0.7, 0.0, 0.0, 20.0], [0.0, 5.0, 0.0, 30.0], [0, 0, 0, 1]], dtype=torch.float64)
    out = ReorderAxesd("image")({"image": MetaTensor(torch.zeros(1, 6, 4, 8), affine=affine)})["image"]
    assert torch.equal(out.affine, affine[:, [0, 2, 1, 3]])
    assert out.pixdim.tolist() == pytest.approx([0.7, 0.7, 5.0])


def test_axis_reordering_can_be_switched_off(tmp_path):
    path = save_nifti(tmp_path / "aniso.nii.gz", np.ones((6, 4, 8)), spacing=(0.7, 5.0, 0.7))
    record = build_preprocessing({**NO_FOREGROUND, "reorder_axes": False})({"image": path})
    assert tuple(record["image"].shape) == (1, 6, 4, 8)


def test_non_finite_values_are_replaced(tmp_path):
    data = np.full((5, 5, 5), 200.0, dtype=np.float32)
    data[0, 0, 0], data[1, 1, 1], data[2, 2, 2] = np.nan, np.inf, -np.inf
    data[3, 3, 3] = 100.0
    record = build_preprocessing({**LINEAR, **NO_FOREGROUND})({"image": save_nifti(tmp_path / "nan.nii.gz", data)})
    image = record["image"][0]
    assert torch.isfinite(image).all()
    # fill="min": the three bad voxels take the finite minimum, 100 -> 100 / 500 - 1 = -0.8.
    for index in ((0, 0, 0), (1, 1, 1), (2, 2, 2)):
        assert float(image[index]) == pytest.approx(-0.8)
    zero = ReplaceNonFinited("image", fill="zero")({"image": torch.tensor([1.0, float("nan"), 3.0])})["image"]
    assert zero.tolist() == [1.0, 0.0, 3.0]
    with pytest.raises(ValueError, match="no finite voxel"):
        ReplaceNonFinited("image")({"image": torch.full((3,), float("nan"))})


def test_percentile_scaling_is_robust_and_clipped(tmp_path):
    data = np.random.default_rng(0).normal(100, 10, size=(20, 20, 20)).astype(np.float32)
    data[0, 0, 0] = 1e6  # one outlier must not squash the range
    record = build_preprocessing(NO_FOREGROUND)({"image": save_nifti(tmp_path / "p.nii.gz", data)})
    image = record["image"]
    assert float(image.min()) == pytest.approx(-1.0) and float(image.max()) == pytest.approx(1.0)
    assert float(image.std()) > 0.15  # the bulk spans the range instead of collapsing near -1


def test_ct_window_maps_hounsfield_units(tmp_path):
    data = np.array([-2000.0, -1000.0, 0.0, 500.0, 3000.0], dtype=np.float32).reshape(5, 1, 1) * np.ones((1, 3, 3))
    cfg = {"intensity": {"mode": "ct_window"}, **NO_FOREGROUND, "reorder_axes": False}
    image = build_preprocessing(cfg)({"image": save_nifti(tmp_path / "ct.nii.gz", data)})["image"]
    assert image[0, :, 0, 0].tolist() == pytest.approx([-1.0, -1.0, 0.0, 0.5, 1.0])


def test_foreground_crop_removes_empty_air(tmp_path):
    data = np.zeros((20, 20, 20), dtype=np.float32)
    data[4:12, 6:15, 3:9] = np.random.default_rng(0).uniform(100, 200, size=(8, 9, 6))
    record = build_preprocessing({"reorder_axes": False})({"image": save_nifti(tmp_path / "fg.nii.gz", data)})
    assert tuple(record["image"].shape) == (1, 8, 9, 6)
    assert float(record["image"].min()) > -0.9 - 1e-6
    # MONAI's Compose wraps transform errors in a RuntimeError; ours is the cause, naming the file.
    with pytest.raises(RuntimeError) as raised:
        build_preprocessing()({"image": save_nifti(tmp_path / "blank.nii.gz", np.zeros((6, 6, 6)))})
    assert isinstance(raised.value.__cause__, ValueError)
    assert "blank.nii.gz" in str(raised.value.__cause__) and "foreground threshold" in str(raised.value.__cause__)


def test_4d_series_keeps_its_frames_as_channels(tmp_path):
    data = np.stack([np.full((5, 6, 7), t, dtype=np.float32) for t in range(4)], axis=-1)
    record = build_preprocessing({"reorder_axes": False})({"image": save_nifti(tmp_path / "f.nii.gz", data)})
    image = record["image"]
    assert type(image) is torch.Tensor and tuple(image.shape) == (4, 5, 6, 7)
    levels = [float(image[t].mean()) for t in range(4)]
    assert levels == sorted(levels) and len(set(levels)) == 4


def test_pick_frame_is_uniform_and_a_view():
    volume = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 2, 2).contiguous()
    rng = np.random.default_rng(0)
    picks = [int(pick_frame(volume, rng)[0, 0, 0, 0]) for _ in range(4000)]
    assert np.allclose(np.bincount(picks, minlength=4) / 4000, 0.25, atol=0.03)
    frame = pick_frame(volume, rng)
    assert frame.shape == (1, 2, 2, 2) and frame.data_ptr() >= volume.data_ptr()
    single = torch.zeros(1, 2, 2, 2)
    assert pick_frame(single, rng).data_ptr() == single.data_ptr()


def test_float16_storage(tmp_path):
    path = save_nifti(tmp_path / "h.nii.gz", np.random.default_rng(0).uniform(0, 1, size=(6, 6, 6)))
    assert build_preprocessing({"storage_dtype": "float16", **NO_FOREGROUND})({"image": path})["image"].dtype == torch.float16


def test_cache_key_tracks_the_data_options_only():
    base = preprocessing_cache_key(None)
    assert preprocessing_cache_key({"intensity": {"lower": 0.05, "upper": 99.95}}) == base  # explicit defaults
    assert preprocessing_cache_key({"cache": {"dir": "/somewhere", "mode": "disk"}}) == base  # where, not what
    changed = [
        {"intensity": {"mode": "ct_window"}},
        {"intensity": {"upper": 99.0}},
        {"foreground": {"threshold": -0.5}},
        {"foreground": {"enabled": False}},
        {"reorder_axes": False},
        {"nonfinite_fill": "zero"},
        {"storage_dtype": "float16"},
        {"target_spacing": [2.0, 2.0, 2.0]},
    ]
    keys = {preprocessing_cache_key(c) for c in changed}
    assert base not in keys and len(keys) == len(changed)


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"intensty": {}}, "intensty"),
        ({"intensity": {"mode": "zscore"}}, "mode"),
        ({"intensity": {"lower": 50, "upper": 10}}, "lower < upper"),
        ({"intensity": {"lower": -5}}, r"\[0, 100\]"),
        ({"nonfinite_fill": "mean"}, "nonfinite_fill"),
        ({"cache": {"mode": "disk"}}, "cache.dir"),
        ({"foreground": {"margin": -1}}, "margin"),
        ({"target_spacing": [2.0, 2.0]}, "target_spacing"),
        ({"target_spacing": [2.0, 0.0, 2.0]}, "target_spacing"),
    ],
)
def test_invalid_preprocessing_config_raises(cfg, message):
    with pytest.raises(ValueError, match=message):
        resolve_preprocessing_config(cfg)


def test_dicom_series_loads_through_pydicom(tmp_path, dicom_series_writer):
    # dicom_series_writer: fixture of tests/data/conftest.py (12 x 10 pixels, 6 slices 2.5 mm apart).
    folder = dicom_series_writer(tmp_path / "series", rows=12, columns=10, n_slices=6, pixel_spacing=(0.8, 0.8))
    record = build_preprocessing(NO_FOREGROUND)({"image": str(folder)})
    assert tuple(record["image"].shape) == (1, 10, 12, 6)
    assert record["spacing"] == pytest.approx([0.8, 0.8, 2.5])
    assert float(record["image"].min()) == pytest.approx(-1.0) and float(record["image"].max()) == pytest.approx(1.0)


def test_target_spacing_resamples_every_volume_to_the_same_voxel_size(tmp_path):
    """A 1 mm and a 4 mm volume of the same 40 mm box both come out at 2 mm: 20 voxels a side."""
    cfg = {**NO_FOREGROUND, **LINEAR, "target_spacing": [2.0, 2.0, 2.0]}
    fine = save_nifti(tmp_path / "fine.nii", np.full((40, 40, 40), 500.0), spacing=(1.0, 1.0, 1.0))
    coarse = save_nifti(tmp_path / "coarse.nii", np.full((10, 10, 10), 500.0), spacing=(4.0, 4.0, 4.0))
    for path in (fine, coarse):
        out = build_preprocessing(cfg)({"image": path})
        assert out["spacing"] == pytest.approx([2.0, 2.0, 2.0])
        assert tuple(out["image"].shape[1:]) == pytest.approx((20, 20, 20), abs=1)
        assert torch.allclose(out["image"], torch.zeros(()), atol=1e-5)  # 500 -> 0 in the window, kept by resampling
    unchanged = build_preprocessing({**NO_FOREGROUND, **LINEAR})({"image": coarse})
    assert tuple(unchanged["image"].shape[1:]) == (10, 10, 10) and unchanged["spacing"] == pytest.approx([4.0] * 3)
