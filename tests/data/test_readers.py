"""Multi-frame DICOM loads through MONAI with the datalist headers' axes, spacing and affine."""

import numpy as np
import pydicom
from monai.transforms import EnsureChannelFirstd, LoadImaged

from dinov2.data.image_io import read_header
from dinov2.data.readers import MultiFrameDicomReader, image_readers


def test_multiframe_dicom_loads_with_header_geometry(tmp_path, dicom_multiframe_writer):
    path = dicom_multiframe_writer(tmp_path / "mf.dcm", rows=16, columns=14, frames=5,
                                  pixel_spacing=(0.7, 0.6), slice_spacing=3.0)
    header = read_header(path)
    load = LoadImaged(keys="image", reader=image_readers(), image_only=True)
    image = EnsureChannelFirstd(keys="image")(load({"image": str(path)}))["image"]
    assert tuple(image.shape) == (1, *header.shape[:3]) == (1, 14, 16, 5)
    np.testing.assert_allclose(image.affine.numpy(), header.affine, atol=1e-4)
    pixels = pydicom.dcmread(path).pixel_array  # (frames, rows, columns)
    np.testing.assert_array_equal(image[0].numpy(), np.transpose(pixels, (2, 1, 0)))


def test_other_files_are_left_to_monai(tmp_path, nifti_writer):
    reader = MultiFrameDicomReader()
    nifti = tmp_path / "a.nii.gz"
    nifti_writer(nifti, (8, 8, 8))
    assert not reader.verify_suffix(str(nifti))
    assert not reader.verify_suffix([str(nifti), str(nifti)])


def test_nifti_loads_without_a_refusal_line_that_reads_like_an_error(tmp_path, nifti_writer, caplog):
    nifti = tmp_path / "a.nii.gz"
    nifti_writer(nifti, (8, 8, 8))
    load = LoadImaged(keys="image", reader=image_readers(), image_only=True)
    with caplog.at_level("INFO"):
        image = load({"image": str(nifti)})["image"]
    assert tuple(image.shape) == (8, 8, 8)
    assert "unable to load" not in caplog.text
