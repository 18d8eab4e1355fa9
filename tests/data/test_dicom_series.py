"""DICOM series folders, built with pydicom from a real volume: voxels and geometry round-trip.

Each series is written the way scanners and anonymisers leave them: file names in no slice order,
InstanceNumber counting against the slice normal, an oblique (rotated about two axes) orientation,
a SliceThickness unrelated to the spacing, and a rescale slope 2 / intercept -1024.
"""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from torch import nn

from dinov2.data.datalist import build_pretrain_datalist
from dinov2.data.image_io import read_header
from dinov2.data.readers import image_readers
from dinov2.data.validation import InputVolumeError, read_volume
from dinov2.eval.presets import DatasetPreset, load_preset
from dinov2.eval.segmentation.inference import predict_case
from dinov2.eval.segmentation.predict import list_cases

SLOPE, INTERCEPT = 2.0, -1024.0
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def rotation(about_z_deg: float, about_x_deg: float) -> np.ndarray:
    """``(4, 4)`` rotation about z then x: an oblique plane without gantry tilt."""
    a, b = np.radians(about_z_deg), np.radians(about_x_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    out = np.eye(4)
    out[:3, :3] = rz @ rx
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """``(data, affine)`` of a real scan cropped to at most 32^3, rotated, saved and re-read as NIfTI.

    The voxel axes are made right-handed, as slices sorted along the DICOM normal always are.
    """
    from dinov2.sample_data import find_pretraining_volumes

    try:
        volumes = find_pretraining_volumes()
    except Exception as exc:  # noqa: BLE001 - sample-data packages not installed
        pytest.skip(f"no real volume: {exc}")
    candidates = [p for p in volumes if len(read_header(p).shape) == 3 and min(read_header(p).shape) >= 24]
    image = nib.load(min(candidates, key=lambda p: p.stat().st_size))
    data = np.asarray(image.dataobj, dtype=np.float32)[:32, :32, :32]
    affine = image.affine.copy()
    if np.linalg.det(affine[:3, :3]) < 0:
        data, flip = data[::-1], np.diag([-1.0, 1.0, 1.0, 1.0])
        flip[0, 3] = data.shape[0] - 1
        affine = affine @ flip
    path = tmp_path_factory.mktemp("source") / "source.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), rotation(20, 15) @ affine), path)
    saved = nib.load(path)
    return np.asarray(saved.dataobj, dtype=np.float32), saved.affine, path


def write_series(folder, data, affine, *, description="T1", number=3, drop=(), offsets=None, prefix="f", seed=0):
    """Write ``data`` (X, Y, Z) on ``affine`` (RAS) as single-frame CT slices; returns the SeriesInstanceUID.

    Args:
        drop: slice indices not written (missing slices).
        offsets: per-slice shift along the slice axis, in slices (uneven spacing).
    """
    folder.mkdir(parents=True, exist_ok=True)
    uid, lps = generate_uid(), LPS @ affine
    dx, dy = np.linalg.norm(lps[:3, :2], axis=0)
    cosines = [*(lps[:3, 0] / dx), *(lps[:3, 1] / dy)]
    stored = np.round((data - INTERCEPT) / SLOPE).astype(np.int16)
    n = data.shape[2]
    names = np.random.default_rng(seed).permutation(n)  # file names in no slice order
    for k in (k for k in range(n) if k not in drop):
        ds = _slice_dataset(uid, description, number)
        ds.InstanceNumber = n - k  # counting against the normal, as many scanners do
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.PixelSpacing = [f"{dy:.6f}", f"{dx:.6f}"]  # (between rows, between columns)
        ds.SliceThickness = "9.9"  # not the spacing: must not be used
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in cosines]
        position = lps[:3, 3] + lps[:3, 2] * (k + (0.0 if offsets is None else offsets[k]))
        ds.ImagePositionPatient = [f"{v:.5f}" for v in position]
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # (rows, columns)
        ds.save_as(folder / f"{prefix}{names[k]:03d}", enforce_file_format=True)
    return uid


def _slice_dataset(uid: str, description: str, number: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.SeriesDescription, ds.SeriesNumber = uid, description, number
    ds.Modality, ds.PatientID = "CT", "anonymous"
    ds.RescaleSlope, ds.RescaleIntercept = f"{SLOPE:g}", f"{INTERCEPT:g}"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 1
    return ds


def load(path) -> torch.Tensor:
    """Voxels as every pipeline reads them."""
    return LoadImage(reader=image_readers(), image_only=True)(str(path))


def test_series_round_trips_voxels_and_geometry(source, tmp_path):
    data, affine, _ = source
    write_series(tmp_path / "ct", data, affine)
    header = read_header(tmp_path / "ct")
    assert header.shape == data.shape and header.format == "dicom-series"
    np.testing.assert_allclose(header.affine, affine, atol=1e-3)
    np.testing.assert_allclose(header.spacing, np.linalg.norm(affine[:3, :3], axis=0), atol=1e-3)  # not 9.9
    image = load(tmp_path / "ct")
    assert image.dtype == torch.float32 and tuple(image.shape) == data.shape
    np.testing.assert_allclose(image.affine.numpy(), affine, atol=1e-3)
    np.testing.assert_allclose(image.numpy(), data, atol=SLOPE / 2)  # within the stored integer's precision
    assert read_volume(tmp_path / "ct").spatial_shape == data.shape


def test_two_series_in_one_folder_are_listed_and_one_can_be_chosen(source, tmp_path):
    data, affine, _ = source
    first = write_series(tmp_path / "mixed", data, affine, description="T1", number=3, prefix="a")
    second = write_series(tmp_path / "mixed", data[::-1].copy(), affine, description="flipped", number=4, prefix="b")
    with pytest.raises(InputVolumeError) as caught:
        read_volume(tmp_path / "mixed")
    message = str(caught.value)
    assert str(tmp_path / "mixed") in message and "2 DICOM series" in message
    assert all(part in message for part in (first, second, "'T1'", "'flipped'", f"{data.shape[2]} slices", "::"))
    with pytest.raises(ValueError, match="2 DICOM series"):  # never both series stacked into one volume
        load(tmp_path / "mixed")
    for choice, expected in ((second, data[::-1]), ("3", data), (second[:-3], data[::-1])):
        path = f"{tmp_path / 'mixed'}::{choice}"
        np.testing.assert_allclose(read_header(path).affine, affine, atol=1e-3)
        np.testing.assert_allclose(load(path).numpy(), expected, atol=SLOPE / 2)
        read_volume(path)
    with pytest.raises(InputVolumeError, match="no DICOM series matches '7'"):
        read_volume(f"{tmp_path / 'mixed'}::7")


def test_missing_slice_is_an_error_naming_the_folder_and_positions(source, tmp_path):
    data, affine, _ = source
    write_series(tmp_path / "gap", data, affine, drop=(12,))
    before = (LPS @ affine)[:3] @ [0, 0, 11, 1]
    with pytest.raises(InputVolumeError, match="1 slice.s. missing") as caught:
        read_volume(tmp_path / "gap")
    assert str(tmp_path / "gap") in str(caught.value) and f"{before[2]:.4g}" in str(caught.value)
    with pytest.raises(ValueError, match="missing"):
        load(tmp_path / "gap")


def test_uneven_spacing_warns_once_and_uses_the_median_step(source, tmp_path, caplog):
    data, affine, _ = source
    offsets = np.random.default_rng(3).uniform(-0.05, 0.05, data.shape[2])
    write_series(tmp_path / "uneven", data, affine, offsets=offsets)
    with caplog.at_level(logging.WARNING):
        header = read_header(tmp_path / "uneven")
        image = load(tmp_path / "uneven")
    warnings = [r.getMessage() for r in caplog.records if "uneven slice spacing" in r.getMessage()]
    assert len(warnings) == 1 and "median step" in warnings[0]
    step = np.linalg.norm(affine[:3, 2])
    median = np.median(np.diff(np.arange(data.shape[2]) + offsets)) * step
    assert header.spacing[2] == pytest.approx(median, abs=1e-3)
    np.testing.assert_allclose(image.affine.numpy(), header.affine, atol=1e-6)
    np.testing.assert_allclose(image.numpy(), data, atol=SLOPE / 2)


def test_datalist_builder_lists_each_series_of_a_folder(source, tmp_path):
    data, affine, _ = source
    folder = tmp_path / "study" / "mixed"
    uids = [write_series(folder, data, affine, number=n, prefix=p) for n, p in ((3, "a"), (4, "b"))]
    entries, skipped = build_pretrain_datalist([tmp_path / "study"], progress=False)
    assert not skipped
    assert sorted(e["image"] for e in entries) == sorted(f"{folder}::{u}" for u in uids)
    assert all(e["shape"] == list(data.shape) for e in entries)
    read_volume(entries[0]["image"])


def tiny_preset() -> DatasetPreset:
    raw = dict(load_preset("brain_tissue"))
    raw.update(roi_size=[16, 16, 16], classes=["background", "bright"],
               intensity={"mode": "percentile", "lower": 0, "upper": 99})
    return DatasetPreset.from_config(raw)


class Threshold(nn.Module):
    """Class 1 where the normalised intensity exceeds 0.5: a model whose answer is known."""

    def forward(self, x):
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 20


def test_predict_takes_a_series_folder_and_writes_nifti_in_its_space(source, tmp_path):
    data, affine, nifti = source
    write_series(tmp_path / "ct", data, affine)
    assert list_cases(tmp_path / "ct") == [("ct", [str(tmp_path / "ct")])]
    assert list_cases(f"{tmp_path / 'ct'}::3") == [("ct_3", [f"{tmp_path / 'ct'}::3"])]
    from_dicom = nib.load(predict_case(Threshold(), tiny_preset(), [str(tmp_path / "ct")], tmp_path / "ct_seg.nii.gz"))
    from_nifti = nib.load(predict_case(Threshold(), tiny_preset(), [str(nifti)], tmp_path / "nifti_seg.nii.gz"))
    assert from_dicom.shape == data.shape
    np.testing.assert_allclose(from_dicom.affine, affine, atol=1e-3)
    labels_dicom, labels_nifti = np.asarray(from_dicom.dataobj), np.asarray(from_nifti.dataobj)
    assert 0.05 < labels_dicom.mean() < 0.95  # a reversed or misplaced slice order would show
    assert np.mean(labels_dicom != labels_nifti) < 0.01  # only the stored integers' rounding differs


def test_visualisation_reads_a_series_folder_in_its_space(source, tmp_path):
    from dinov2.eval.visualisation.inputs import load_vis_volume

    data, affine, _ = source
    write_series(tmp_path / "ct", data, affine)
    volume = load_vis_volume(tmp_path / "ct")
    assert volume.shape == data.shape and volume.stem == "ct"  # outputs: ct_pca_0.nii.gz, ...
    np.testing.assert_allclose(volume.affine, affine, atol=1e-3)
