"""Reading and writing image / label stacks (dinov2/eval/instances/io.py)."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest

from dinov2.data.validation import InputVolumeError
from dinov2.eval.instances import io
from dinov2.utils.errors import UserError

tifffile = pytest.importorskip("tifffile", reason="TIFF stacks need the optional extra 'instances'")

SHAPE = (5, 6, 7)  # (X, Y, Z): every axis a different length, so a transposition cannot pass


def _asymmetric(dtype=np.uint16) -> np.ndarray:
    """``(X, Y, Z)`` with a different value at every voxel."""
    return np.arange(np.prod(SHAPE)).reshape(SHAPE).astype(dtype)


def _imagej_tiff(path, xyz: np.ndarray, spacing=None, unit="micron"):
    """``xyz`` written as Fiji does: planes (Z, Y, X), spacing in ImageJ metadata."""
    kwargs, metadata = {}, {"axes": "ZYX"}
    if spacing is not None:
        kwargs["resolution"] = (1 / spacing[0], 1 / spacing[1])
        metadata.update(spacing=spacing[2], unit=unit)
    tifffile.imwrite(path, np.ascontiguousarray(xyz.transpose(2, 1, 0)), imagej=True, metadata=metadata, **kwargs)
    return path


def test_tiff_is_read_as_xyz_and_labels_round_trip_with_spacing(tmp_path):
    xyz = _asymmetric()
    path = _imagej_tiff(tmp_path / "cells.tif", xyz, spacing=(0.3, 0.4, 2.5))
    planes = tifffile.imread(path)
    assert planes.shape == (7, 6, 5)
    image = io.read_image(path)
    assert image.kind == "tiff" and image.array.dtype == np.float32 and image.shape == SHAPE
    np.testing.assert_array_equal(image.array, xyz)
    assert image.array[1, 2, 3] == planes[3, 2, 1]  # (x, y, z) is plane z, row y, column x
    assert image.spacing == pytest.approx((0.3, 0.4, 2.5), rel=1e-6)
    np.testing.assert_allclose(image.affine, np.diag([0.3, 0.4, 2.5, 1.0]), rtol=1e-6)
    assert image.meta["unit"] == "micron"

    labels = (xyz % 4).astype(np.int32)
    out = io.write_labels(tmp_path / "out" / io.output_name(path), labels, image)
    assert out.name == "cells_instances.tif"
    assert tifffile.imread(out).dtype == np.uint16
    np.testing.assert_array_equal(tifffile.imread(out), labels.transpose(2, 1, 0))
    back = io.read_labels(out)
    np.testing.assert_array_equal(back.array, labels)
    assert back.spacing == pytest.approx(image.spacing, rel=1e-6) and back.meta["unit"] == "micron"
    assert not [p for p in out.parent.iterdir() if p.name != out.name]  # no temporary file left


def test_ome_physical_size_is_the_spacing(tmp_path):
    path = tmp_path / "ome.tif"
    tifffile.imwrite(path, _asymmetric().transpose(2, 1, 0), ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.25, "PhysicalSizeZ": 1.5})
    stack = io.read_image(path)
    np.testing.assert_array_equal(stack.array, _asymmetric())
    assert stack.spacing == pytest.approx((0.2, 0.25, 1.5))


def test_singleton_channel_is_squeezed(tmp_path):
    path = tmp_path / "one_channel.tif"
    tifffile.imwrite(path, _asymmetric().transpose(2, 1, 0)[:, None], imagej=True, metadata={"axes": "ZCYX"})
    np.testing.assert_array_equal(io.read_image(path).array, _asymmetric())


def test_nifti_labels_keep_the_affine_and_header_spacing(tmp_path):
    affine = np.array([[0.0, -2.0, 0.0, 10.0], [1.5, 0.0, 0.0, 5.0], [0.0, 0.0, 3.0, -1.0], [0.0, 0.0, 0.0, 1.0]])
    nib.save(nib.Nifti1Image(_asymmetric(np.float32), affine), tmp_path / "scan.nii.gz")
    image = io.read_image(tmp_path / "scan.nii.gz")
    assert image.kind == "nifti" and image.spacing == pytest.approx((1.5, 2.0, 3.0))
    np.testing.assert_array_equal(image.array, _asymmetric())  # NIfTI keeps its (X, Y, Z) order
    labels = (_asymmetric() % 3).astype(np.int64)
    out = io.write_labels(tmp_path / io.output_name(image.path), labels, image)
    assert out.name == "scan_instances.nii.gz"
    written = nib.load(out)
    np.testing.assert_allclose(written.affine, affine)
    assert written.get_data_dtype() == np.uint16 and written.header.get_zooms() == pytest.approx((1.5, 2.0, 3.0))
    back = io.read_labels(out, like=image)
    np.testing.assert_array_equal(back.array, labels)
    np.testing.assert_allclose(back.affine, affine)


def test_missing_spacing_warns_once_and_an_explicit_one_wins(tmp_path, caplog):
    path = _imagej_tiff(tmp_path / "bare.tif", _asymmetric())
    with caplog.at_level(logging.WARNING, logger="dinov2.eval.instances.io"):
        first = io.read_image(path)
        io.read_image(path)
    warnings = [r.getMessage() for r in caplog.records if r.name == "dinov2.eval.instances.io"]
    assert len(warnings) == 1
    assert str(path) in warnings[0] and "--spacing" in warnings[0] and '"spacing"' in warnings[0]
    assert first.spacing == (1.0, 1.0, 1.0) and first.meta["spacing_source"] == "default"

    caplog.clear()
    given = io.read_image(path, spacing=(2, 3, 4))
    assert given.spacing == (2.0, 3.0, 4.0) and np.allclose(given.affine, np.diag([2, 3, 4, 1]))
    # labels without spacing take their image's, silently
    labels_path = _imagej_tiff(tmp_path / "bare_labels.tif", _asymmetric() % 2)
    with caplog.at_level(logging.WARNING, logger="dinov2.eval.instances.io"):
        labels = io.read_labels(labels_path, like=given)
    assert labels.spacing == (2.0, 3.0, 4.0) and not caplog.records
    # the spacing given is written, and read back as the file's
    out = io.write_labels(tmp_path / "given_instances.tif", labels.array, given)
    assert io.read_labels(out).spacing == pytest.approx((2.0, 3.0, 4.0))
    with pytest.raises(UserError, match="three positive numbers"):
        io.read_image(path, spacing=(1, 0, 1))


def _bad_files(tmp_path):
    """``(path, words the message must hold, reader)`` of every kind of bad input."""
    good = _imagej_tiff(tmp_path / "good.tif", _asymmetric(), spacing=(1, 1, 1)).read_bytes()
    (tmp_path / "empty.tif").write_bytes(b"")
    (tmp_path / "junk.tif").write_bytes(b"this is not an image" * 20)
    (tmp_path / "truncated.tif").write_bytes(good[: len(good) // 2])
    tifffile.imwrite(tmp_path / "plane.tif", np.zeros((6, 5), np.uint16))
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((4, 6, 5, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(tmp_path / "two_channels.tif", np.zeros((4, 2, 6, 5), np.uint16), imagej=True,
                     metadata={"axes": "ZCYX"})
    tifffile.imwrite(tmp_path / "movie.tif", np.zeros((3, 4, 6, 5), np.uint16), imagej=True, metadata={"axes": "TZYX"})
    (tmp_path / "junk.nii.gz").write_bytes(b"not gzip at all" * 10)
    (tmp_path / "image.png").write_bytes(b"png")
    _imagej_tiff(tmp_path / "fractional.tif", _asymmetric(np.float32) / 7)
    nib.save(nib.Nifti1Image(-np.ones(SHAPE, np.int16), np.eye(4)), tmp_path / "negative.nii.gz")
    return [
        ("missing.tif", "does not exist", io.read_image),
        ("empty.tif", "empty", io.read_image),
        ("junk.tif", "not a TIFF", io.read_image),
        ("truncated.tif", "truncated", io.read_image),
        ("plane.tif", "2D", io.read_image),
        ("rgb.tif", "3 channels", io.read_image),
        ("two_channels.tif", "2 channels", io.read_image),
        ("movie.tif", "time series", io.read_image),
        ("junk.nii.gz", "not gzip", io.read_image),
        ("image.png", "neither TIFF", io.read_image),
        ("fractional.tif", "non-integer", io.read_labels),
        ("negative.nii.gz", "negative", io.read_labels),
    ]


def test_bad_files_give_one_line_naming_the_file(tmp_path):
    for name, words, reader in _bad_files(tmp_path):
        with pytest.raises(InputVolumeError) as caught:
            reader(tmp_path / name)
        message = str(caught.value)
        assert str(tmp_path / name) in message and words in message, (name, message)
        assert "\n" not in message, name


def test_labels_off_the_image_shape_name_both_files(tmp_path):
    image = io.read_image(_imagej_tiff(tmp_path / "image.tif", _asymmetric()))
    other = _imagej_tiff(tmp_path / "labels.tif", np.zeros((5, 6, 8), np.uint16))
    with pytest.raises(InputVolumeError, match="shape") as caught:
        io.read_labels(other, like=image)
    assert str(other) in str(caught.value) and str(image.path) in str(caught.value)


def test_more_than_65535_objects_are_refused_fewer_with_large_ids_renumbered(tmp_path):
    like = io.new_stack(np.zeros((41, 41, 40), np.float32), (1, 1, 1), "tiff", tmp_path / "like.tif")
    many = np.arange(41 * 41 * 40).reshape(41, 41, 40)  # 67239 objects
    with pytest.raises(UserError, match="65535"):
        io.write_labels(tmp_path / "many.tif", many, like)
    assert not list(tmp_path.iterdir())

    few = np.zeros((41, 41, 40), np.int64)
    few[:10], few[20:30] = 70_000, 5  # two objects, one id beyond uint16
    back = io.read_labels(io.write_labels(tmp_path / "few.tif", few, like)).array
    assert sorted(np.unique(back)) == [0, 1, 2]
    np.testing.assert_array_equal(back == back[0, 0, 0], few == 70_000)
    np.testing.assert_array_equal(back == back[25, 0, 0], few == 5)


def test_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path, monkeypatch):
    like = io.new_stack(np.zeros(SHAPE, np.float32), (1, 1, 1), "tiff", tmp_path / "like.tif")

    def broken(path, array, stack):
        path.write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(io, "_write_tiff", broken)
    with pytest.raises(OSError):
        io.write_labels(tmp_path / "out.tif", np.zeros(SHAPE, np.int32), like)
    assert not list(tmp_path.iterdir())


def test_list_stacks_and_output_names(tmp_path):
    for name in ("b.nii.gz", "a.tif", "c.TIFF", "d.nii", "notes.txt", ".hidden.tif"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.tif").write_bytes(b"x")
    assert [p.name for p in io.list_stacks(tmp_path)] == ["a.tif", "b.nii.gz", "c.TIFF", "d.nii"]
    assert io.list_stacks(tmp_path / "a.tif") == [tmp_path / "a.tif"]
    with pytest.raises(InputVolumeError, match="holds no stack"):
        io.list_stacks(_empty(tmp_path))
    with pytest.raises(InputVolumeError, match="not a stack file"):
        io.list_stacks(tmp_path / "notes.txt")
    assert io.output_name("cells.tif") == "cells_instances.tif"
    assert io.output_name("dir/a.nii.gz") == "a_instances.nii.gz"
    assert io.output_name("x.v2.TIFF", "_pred") == "x.v2_pred.TIFF"
    assert io.stack_stem("a.nii") == "a"


def _empty(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "readme.md").write_text("no stacks here")
    return folder
