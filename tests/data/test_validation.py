"""The one validated way in (dinov2.data.validation): every bad volume is one InputVolumeError naming the file."""

from __future__ import annotations

import gzip
import logging
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dinov2.data import validation
from dinov2.data.datasets import normalise_datalist
from dinov2.data.transforms import build_preprocessing
from dinov2.data.validation import (
    InputVolumeError,
    check_same_grid,
    explain_read_error,
    find_input_error,
    read_label_map,
    read_volume,
)
from dinov2.eval.visualisation.inputs import load_vis_volume
from dinov2.utils.errors import UserError

SHAPE = (16, 16, 16)
# Words of the reader internals that must not be the message.
INTERNALS = ("EOFError", "BadGzipFile", "ImageFileError", "InvalidDicomError", "applying transform", "Traceback")


def volume(seed: int = 0, shape=SHAPE) -> np.ndarray:
    data = np.random.default_rng(seed).uniform(0, 10, size=shape).astype(np.float32)
    data[4:12, 4:12, 4:12] += 100
    return data


def save(path: Path, data: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def truncated(path: Path) -> Path:
    full = gzip.compress(nib.Nifti1Image(volume(), np.eye(4)).to_bytes())
    path.write_bytes(full[: len(full) // 2])
    return path


def random_bytes(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    return path


def two_d(path: Path) -> Path:
    return save(path, volume(shape=(16, 16, 1))[..., 0])


def four_d(path: Path) -> Path:
    return save(path, np.stack([volume(seed=t) for t in range(3)], axis=-1))


def five_d(path: Path) -> Path:
    return save(path, np.stack([volume()] * 2, axis=-1)[..., None, :])


def all_nan(path: Path) -> Path:
    return save(path, np.full(SHAPE, np.nan, dtype=np.float32))


BAD = {
    "empty": (empty, "empty (0 bytes)"),
    "truncated_gzip": (truncated, "truncated"),
    "random_bytes": (random_bytes, "not gzip-compressed"),
    "random_bytes_nii": (random_bytes, "does not start with a NIfTI header"),
    "random_bytes_dcm": (random_bytes, "not a DICOM file"),
    "two_d": (two_d, "2D"),
    "four_d_without_frame": (four_d, "choose one with --frame N (0..2)"),
    "five_d": (five_d, "5D"),
    "all_nan": (all_nan, "no finite voxel"),
}
SUFFIX = {"random_bytes_nii": ".nii", "random_bytes_dcm": ".dcm"}


@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_volume_is_one_error_naming_the_file(kind, tmp_path):
    make, words = BAD[kind]
    path = make(tmp_path / f"{kind}{SUFFIX.get(kind, '.nii.gz')}")
    with pytest.raises(InputVolumeError) as raised:
        read_volume(path)
    error = raised.value
    assert isinstance(error, ValueError) and isinstance(error, UserError)
    assert str(error).startswith(f"{path}: ") and error.path == path
    assert words.lower() in str(error).lower(), str(error)
    assert not any(word in str(error) for word in INTERNALS), str(error)
    assert "\n" not in str(error)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(InputVolumeError, match="does not exist"):
        read_volume(tmp_path / "missing.nii.gz")


def test_a_4d_series_needs_a_frame_or_as_many_channels(tmp_path):
    path = four_d(tmp_path / "series.nii.gz")
    checked = read_volume(path, frame=1)
    assert checked.frame == 1 and checked.frames == 3 and checked.spatial_shape == SHAPE
    with pytest.raises(InputVolumeError, match="has 3 frames"):
        read_volume(path, frame=3)
    # a 1-channel model given 3 frames: the message says how to choose one
    with pytest.raises(InputVolumeError, match="takes one 3D volume") as raised:
        read_volume(path, channels=1)
    assert "--frame" in str(raised.value)
    assert read_volume(path, channels=3).channels == 3  # the frames are the model's channels
    with pytest.raises(InputVolumeError, match="takes 2 channels"):
        read_volume(path, channels=2)
    with pytest.raises(InputVolumeError, match="one frame gives 1 channel"):
        read_volume(path, frame=0, channels=3)
    assert read_volume(path, any_frames=True).channels == 3  # pretraining: frames are picked later
    with pytest.raises(InputVolumeError, match="Split the series into 3D volumes"):
        read_volume(path, frame_flag=None)  # an input without a frame option


def test_a_3d_volume_for_a_multi_channel_model(tmp_path):
    with pytest.raises(InputVolumeError, match="one 3D volume but the model takes 3 channels"):
        read_volume(save(tmp_path / "one.nii.gz", volume()), channels=3)


def test_a_trailing_length_one_axis_is_a_3d_volume(tmp_path):
    checked = read_volume(save(tmp_path / "v.nii.gz", volume()[..., None]))
    assert checked.shape == SHAPE and checked.frames == 1


def test_some_infinite_voxels_are_tolerated_with_one_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(validation, "_warned", set())
    data = volume()
    data[0, 0, 0], data[1, 1, 1], data[2, 2, 2] = np.inf, -np.inf, np.nan
    path = save(tmp_path / "inf.nii.gz", data)
    caplog.set_level(logging.WARNING, logger="dinov2.data.validation")
    checked = read_volume(path)
    assert checked.nonfinite == 3 and checked.fill_value == pytest.approx(float(data[np.isfinite(data)].min()))
    read_volume(path)
    # the pipeline that fills them says nothing more about the same file
    record = build_preprocessing({"foreground": {"enabled": False}})({"image": str(path)})
    assert np.isfinite(record["image"].numpy()).all()
    lines = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert len(lines) == 1 and "3 of 4096 voxels are NaN or +-Inf" in lines[0] and "smallest finite value" in lines[0]


@pytest.mark.parametrize("kind", ["truncated_gzip", "random_bytes", "two_d", "five_d", "all_nan"])
def test_the_pretraining_read_path_names_the_file(kind, tmp_path):
    make, _ = BAD[kind]
    path = make(tmp_path / f"{kind}.nii.gz")
    with pytest.raises(Exception) as raised:  # MONAI's Compose wraps it in RuntimeError("applying transform ...")
        build_preprocessing({"foreground": {"enabled": False}})({"image": str(path)})
    error = find_input_error(raised.value)
    assert isinstance(error, InputVolumeError) and error.path == path, raised.value


def test_the_pretraining_datalist_rejects_an_empty_file(tmp_path):
    path = empty(tmp_path / "empty.nii.gz")
    with pytest.raises(InputVolumeError, match="empty file"):
        normalise_datalist([str(path)])


def test_reader_errors_are_explained_through_wrappers():
    try:
        try:
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")
        except EOFError as inner:
            raise RuntimeError("applying transform <monai.transforms.io.dictionary.LoadImaged>") from inner
    except RuntimeError as outer:
        assert "truncated" in explain_read_error(outer)
    assert explain_read_error(ValueError("something else")) is None


def test_the_error_survives_pickling(tmp_path):
    error = InputVolumeError(tmp_path / "a.nii.gz", "the label map is odd", "fix it", others=[tmp_path / "b.nii.gz"])
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and copy.others == error.others and copy.reason == "the label map is odd. Fix it."


# ------------------------------------------------------------------------------------------------
# Label maps and grids
# ------------------------------------------------------------------------------------------------


def test_label_values_outside_the_classes(tmp_path):
    label = np.zeros(SHAPE, np.uint8)
    label[1, 1, 1], label[2, 2, 2] = 1, 5
    path = save(tmp_path / "lab.nii.gz", label)
    with pytest.raises(InputVolumeError) as raised:
        read_label_map(path, {0, 1}, "0 background, 1 tumour")
    message = str(raised.value)
    assert message.startswith(str(path)) and "value(s) 5" in message and "0 background, 1 tumour" in message
    assert list(read_label_map(path, {0, 1, 5}, "any")) == [0, 1, 5]


def test_non_integer_label_values(tmp_path):
    path = save(tmp_path / "soft.nii.gz", np.full(SHAPE, 0.5, dtype=np.float32))
    with pytest.raises(InputVolumeError, match="non-integer"):
        read_label_map(path, {0, 1}, "0 background, 1 a")


def test_label_grid_mismatch_names_both_files(tmp_path):
    image = save(tmp_path / "img.nii.gz", volume())
    small = save(tmp_path / "small.nii.gz", np.zeros((16, 16, 8), np.uint8))
    moved = save(tmp_path / "moved.nii.gz", np.zeros(SHAPE, np.uint8), np.diag([1.0, 1.0, 3.0, 1.0]))
    with pytest.raises(InputVolumeError) as raised:
        read_label_map(small, {0}, "0 background", image=image)
    assert str(small) in str(raised.value) and str(image) in str(raised.value) and "shape" in str(raised.value)
    with pytest.raises(InputVolumeError) as raised:
        check_same_grid(image, moved)
    assert str(moved) in str(raised.value) and str(image) in str(raised.value) and "affine" in str(raised.value)
    assert raised.value.others == (image,)


def test_label_map_that_cannot_be_read(tmp_path):
    path = truncated(tmp_path / "lab.nii.gz")
    with pytest.raises(InputVolumeError, match="truncated") as raised:
        read_label_map(path, {0, 1}, "0 background, 1 a")
    assert "label map" in str(raised.value)


# ------------------------------------------------------------------------------------------------
# Visualisation inputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["empty", "truncated_gzip", "random_bytes", "two_d", "five_d", "all_nan"])
def test_visualisation_inputs_name_the_file(kind, tmp_path):
    make, words = BAD[kind]
    path = make(tmp_path / f"{kind}.nii.gz")
    with pytest.raises(InputVolumeError) as raised:
        load_vis_volume(path)
    assert str(raised.value).startswith(str(path)) and words.lower() in str(raised.value).lower()


def test_visualisation_takes_a_frame_and_checks_the_mask_grid(tmp_path):
    path = four_d(tmp_path / "series.nii.gz")
    assert load_vis_volume(path, frame=2).frame == 2
    with pytest.raises(InputVolumeError, match="has 3 frames"):
        load_vis_volume(path, frame=5)
    mask = save(tmp_path / "mask.nii.gz", np.ones((16, 16, 8), np.uint8))
    with pytest.raises(InputVolumeError) as raised:
        load_vis_volume(path, frame=0, mask_path=mask)
    assert str(mask) in str(raised.value) and str(path) in str(raised.value)
