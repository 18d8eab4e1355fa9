"""A running server (a real child process on loopback) with a tiny finetuned model, and real volumes."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dinov2.checkpoints.finetuned import save_finetuned
from dinov2.eval.presets import DatasetPreset, load_preset
from dinov2.eval.segmentation.model import build_segmentation_model
from dinov2.models import build_model
from dinov2.serve.process import ServerProcess

SIDE = 32


def tiny_preset(**changes) -> DatasetPreset:
    """brain_tissue with 16³ windows and two classes."""
    raw = dict(load_preset("brain_tissue"))
    raw.update({"image_size": [16, 16, 16], "classes": ["background", "bright"], "datalist": "dataset.json",
                "intensity": {"mode": "percentile", "lower": 0, "upper": 100}})
    raw.update(changes)
    return DatasetPreset.from_config(raw)


def write_checkpoint(path: Path, preset: DatasetPreset, seed: int = 0) -> Path:
    """A finetuned checkpoint of a tiny random UNETR (``preset``'s channels and classes)."""
    torch.manual_seed(seed)
    kwargs = {"embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 8, "img_size": 16}
    model = build_segmentation_model(build_model("vit_tiny_3d", **kwargs), "UNETR", preset.in_channels,
                                     preset.out_channels, {"feature_size": 4})
    config = {"model": {"unetr": {"feature_size": 4}, "modality_merge": "concat"}, "evaluation": {"overlap": 0.25}}
    return save_finetuned(path, model, {"arch": "vit_tiny_3d", "kwargs": kwargs}, config, preset, 7,
                          {"name": "dice", "value": 0.5})


@pytest.fixture(scope="session")
def tiny_preset_factory():
    """:func:`tiny_preset` (a fixture: test modules do not import conftest by name)."""
    return tiny_preset


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "best_model.pth", tiny_preset())


@pytest.fixture(scope="session")
def real_volume(crop_sample_volume) -> Path:
    """A real T1 MRI (the MNI152 2 mm template) cropped to 32³ around its centre, affine kept right."""
    return crop_sample_volume("MNI152_T1_2mm.nii.gz", SIDE, "mni_crop.nii.gz")


@pytest.fixture(scope="session")
def server(checkpoint, tmp_path_factory):
    """The service on a free loopback port: 2 at once, 1 MB uploads; stopped after the session."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    process = ServerProcess(checkpoint, log, ["--concurrency", "2", "--max-upload-mb", "1", "--device", "cpu",
                                              "--threads", "1"])
    try:
        yield process.wait_ready(90)
    finally:
        process.stop()


@pytest.fixture(scope="session")
def dicom_zip():
    """:func:`write_dicom_zip` (a fixture: test modules do not import conftest by name)."""
    return write_dicom_zip


def write_dicom_zip(data: np.ndarray, spacing=(2.0, 2.0, 2.0), series: int = 1) -> bytes:
    """A zip of ``series`` DICOM series of ``data`` (``(X, Y, Z)`` = columns, rows, slices; uint16)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for s in range(series):
            uid = generate_uid()
            for k in range(data.shape[2]):
                slice_bytes = io.BytesIO()
                _slice(data[:, :, k].T, uid, k, spacing).save_as(slice_bytes, enforce_file_format=True)
                archive.writestr(f"series{s}/IM{k:04d}.dcm", slice_bytes.getvalue())
    return buffer.getvalue()


def _slice(pixels: np.ndarray, series_uid: str, index: int, spacing) -> Dataset:
    """One axial MR slice ``(rows, columns)`` at ``index * spacing[2]`` mm."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), series_uid, "MR"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[0]:g}"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0.0, 0.0, index * spacing[2]]
    ds.SliceThickness, ds.InstanceNumber = f"{spacing[2]:g}", index + 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    return ds
