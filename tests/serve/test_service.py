"""The service over loopback: a real server process, real volumes, good and bad requests."""

from __future__ import annotations

import gzip
import json
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dinov2.data.image_io import read_header
from dinov2.eval.segmentation import predict
from dinov2.serve import Client

pytestmark = pytest.mark.usefixtures("one_thread")


def post(url: str, body: bytes, query: str = "", content_type: str = "application/octet-stream"):
    """``(status, headers, body bytes)`` of a raw POST (no retries: what the server answered first)."""
    request = urllib.request.Request(url + ("?" + query if query else ""), data=body, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def labels_of(data: bytes, folder: Path, name: str) -> nib.Nifti1Image:
    path = folder / name
    path.write_bytes(data)
    return nib.load(path)


def predicted(checkpoint: Path, image: Path, out: Path) -> nib.Nifti1Image:
    """What ``python -m dinov2.eval.segmentation.predict`` writes for ``image``."""
    assert predict.main(["--checkpoint", str(checkpoint), "--input", str(image), "--output", str(out),
                         "--device", "cpu", "--no-preview"]) == 0
    return nib.load(next(out.glob("*_seg.nii.gz")))


def assert_same_labels(served: nib.Nifti1Image, reference: nib.Nifti1Image) -> None:
    assert served.shape == reference.shape
    np.testing.assert_allclose(served.affine, reference.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(served.dataobj), np.asarray(reference.dataobj))


def test_health_model_and_docs(server):
    client = Client(server.url)
    assert client.health()["status"] == "ok"
    info = client.model()
    assert info["package"] == "dinov2-3d" and info["classes"] == ["background", "bright"]
    assert info["architecture"]["embed_dim"] == 32 and info["preprocessing"]["window_size"] == [16, 16, 16]
    assert info["service"]["concurrency"] == 2
    with urllib.request.urlopen(server.url + "/docs", timeout=10) as page:
        assert b"swagger" in page.read().lower()
    with urllib.request.urlopen(server.url + "/openapi.json", timeout=10) as spec:
        assert {"/v1/segment", "/v1/embed", "/v1/model", "/healthz"} <= set(json.loads(spec.read())["paths"])


def test_segment_matches_predict(server, checkpoint, real_volume, tmp_path):
    result = Client(server.url).segment(real_volume, out=tmp_path / "served.nii.gz")
    served = nib.load(result.path)
    assert_same_labels(served, predicted(checkpoint, real_volume, tmp_path / "predict"))
    voxel_ml = abs(np.linalg.det(served.affine[:3, :3])) / 1000
    assert result.volumes_ml == {"bright": pytest.approx(np.count_nonzero(np.asarray(served.dataobj) == 1) * voxel_ml)}


def test_dicom_series_zip_and_folder(server, checkpoint, real_volume, dicom_zip, tmp_path):
    data = np.asarray(nib.load(real_volume).dataobj)
    data = np.round(data / data.max() * 1000).astype(np.uint16)
    archive = tmp_path / "series.zip"
    archive.write_bytes(dicom_zip(data))
    client = Client(server.url)
    from_zip = labels_of(client.segment(archive).data, tmp_path, "zip_seg.nii.gz")
    # The reference: predict on a NIfTI of the same voxels on the series' grid (as the toolkit reads it).
    zipfile.ZipFile(archive).extractall(tmp_path / "unzipped")
    folder = tmp_path / "unzipped" / "series0"
    grid = read_header(folder)
    assert from_zip.shape == grid.shape == data.shape
    nib.save(nib.Nifti1Image(data.astype(np.float32), grid.affine), tmp_path / "same.nii.gz")
    assert_same_labels(from_zip, predicted(checkpoint, tmp_path / "same.nii.gz", tmp_path / "predict"))
    from_folder = labels_of(client.segment(folder).data, tmp_path, "folder_seg.nii.gz")  # zipped by the client
    assert_same_labels(from_folder, from_zip)


def test_embed(server, real_volume):
    features = Client(server.url).embed(real_volume)
    assert np.asarray(features["cls"]).shape == (1, 32) == np.asarray(features["patch_mean"]).shape
    assert np.isfinite(features["cls"]).all() and features["windows"] == 8 and features["streams"] == ["T1w"]


def test_multipart_upload(server, real_volume, tmp_path):
    boundary = "dinov2boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"scan.nii.gz\"\r\n"
            "Content-Type: application/gzip\r\n\r\n")
    body = head.encode() + real_volume.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    status, headers, data = post(server.url + "/v1/segment", body,
                                 content_type=f"multipart/form-data; boundary={boundary}")
    assert status == 200 and 'filename="scan_seg.nii.gz"' in headers["Content-Disposition"]
    reference = Client(server.url).segment(real_volume).data
    assert_same_labels(labels_of(data, tmp_path, "a.nii.gz"), labels_of(reference, tmp_path, "b.nii.gz"))


def test_eight_concurrent_requests(server, real_volume):
    client = Client(server.url)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: client.segment(real_volume), range(8)))
    arrays = [np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(r.data)).dataobj) for r in results]
    assert all(np.array_equal(a, arrays[0]) for a in arrays) and len({json.dumps(r.volumes_ml) for r in results}) == 1
    assert client.health()["running"] == 0
