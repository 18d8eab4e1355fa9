"""Fixtures that write small NIfTI volumes and DICOM series/multi-frame files into a tmp folder."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def write_nifti(
    path: Path, shape: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0), affine=None, dtype=np.int16, seed=0
) -> Path:
    """Random-valued NIfTI volume; ``affine`` defaults to diag(spacing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).integers(0, 100, size=tuple(shape)).astype(dtype)
    if affine is None:
        affine = np.diag(list(spacing)[:3] + [1.0])
    image = nib.Nifti1Image(data, affine)
    image.header.set_zooms((tuple(spacing) + (1.0,) * len(shape))[: len(shape)])
    nib.save(image, path)
    return path


def _dicom_dataset(rows: int, columns: int, series_uid: str, pixel_spacing: Sequence[float]) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "MR"
    ds.PatientID = "anonymous"
    ds.Rows, ds.Columns = rows, columns
    ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def write_dicom_series(
    folder: Path, rows: int, columns: int, n_slices: int, pixel_spacing=(0.8, 0.9), slice_spacing: float = 2.5,
    series_uid: str | None = None, positions: bool = True, name: str = "IM{:04d}",
) -> Path:
    """One single-frame MR slice per file, axial, slices ``slice_spacing`` mm apart (written in shuffled order)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    rng = np.random.default_rng(n_slices)
    for k in rng.permutation(n_slices):
        ds = _dicom_dataset(rows, columns, series_uid, pixel_spacing)
        ds.InstanceNumber = int(k) + 1
        ds.SliceThickness = f"{slice_spacing:g}"
        if positions:
            ds.ImagePositionPatient = [-10.0, 20.0, 5.0 + slice_spacing * int(k)]
        else:
            del ds.ImageOrientationPatient
        ds.PixelData = rng.integers(0, 1000, size=(rows, columns), dtype=np.uint16).tobytes()
        ds.save_as(folder / name.format(int(k)), enforce_file_format=True)
    return folder


def write_dicom_multiframe(
    path: Path, rows: int, columns: int, frames: int, pixel_spacing=(0.7, 0.6), slice_spacing: float = 3.0
) -> Path:
    """Classic multi-frame MR file: top-level PixelSpacing and SpacingBetweenSlices."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _dicom_dataset(rows, columns, generate_uid(), pixel_spacing)
    ds.NumberOfFrames = frames
    ds.SpacingBetweenSlices = f"{slice_spacing:g}"
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.PixelData = np.random.default_rng(0).integers(0, 1000, size=(frames, rows, columns), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def dicom_multiframe_writer():
    """:func:`write_dicom_multiframe` as a fixture."""
    return write_dicom_multiframe


@pytest.fixture
def nifti_writer():
    """:func:`write_nifti` (a fixture, so tests need not import this conftest by name)."""
    return write_nifti


@pytest.fixture
def dicom_series_writer():
    """:func:`write_dicom_series`."""
    return write_dicom_series


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """A mixed folder: NIfTI (3D, 4D, .nii), a DICOM series, a multi-frame file, junk files."""
    root = tmp_path / "data"
    write_nifti(root / "a" / "big.nii.gz", (20, 18, 16), spacing=(1.5, 1.5, 2.0))
    write_nifti(root / "a" / "four_d.nii.gz", (20, 20, 20, 2))
    write_nifti(root / "b" / "plain.nii", (24, 20, 18), spacing=(0.5, 0.5, 0.5))
    write_nifti(root / "b" / "tiny.nii.gz", (4, 20, 20))
    write_dicom_series(root / "dicom" / "series1", rows=12, columns=10, n_slices=6)
    write_dicom_multiframe(root / "dicom" / "mf" / "volume.dcm", rows=16, columns=14, frames=5)
    (root / "a" / "broken.nii.gz").write_bytes(b"this is not a nifti file")
    (root / "a" / "notes.txt").write_text("not an image")
    return root
