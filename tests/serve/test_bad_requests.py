"""Bad uploads get a 4xx JSON error naming the problem in words; the server keeps serving."""

from __future__ import annotations

import gzip
import io
import json
import socket
import urllib.error
import urllib.request
import zipfile

import nibabel as nib
import numpy as np
import pytest

from dinov2.serve import Client, ServeError

pytestmark = pytest.mark.usefixtures("one_thread")


def nifti_bytes(data: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(data.astype(np.float32), np.eye(4) * [2, 2, 2, 1]).to_bytes())


def cube(*extra: int) -> np.ndarray:
    data = np.random.default_rng(0).uniform(0, 10, (16, 16, 16, *extra)).astype(np.float32)
    data[4:12, 4:12, 4:12] += 100
    return data


def request(url: str, body: bytes | None = None, query: str = "", method: str = "POST",
            content_type: str = "application/octet-stream") -> tuple[int, dict]:
    """``(status, JSON body)`` of one request, without retries."""
    req = urllib.request.Request(url + ("?" + query if query else ""), data=body, method=method,
                                 headers={"Content-Type": content_type} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as answer:
            return answer.status, {}
    except urllib.error.HTTPError as exc:
        text = exc.read().decode()
        assert "Traceback" not in text, text
        return exc.code, json.loads(text)


def bad_uploads(dicom_zip) -> dict[str, tuple[bytes, str, int, str]]:
    """name: (body, query, status, words the detail must hold)."""
    full = nifti_bytes(cube())
    empty_zip, text_zip, bomb = io.BytesIO(), io.BytesIO(), io.BytesIO()
    zipfile.ZipFile(empty_zip, "w").close()
    with zipfile.ZipFile(text_zip, "w") as archive:
        archive.writestr("notes.txt", "no images here")
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("IM0001.dcm", bytes(5 * 2**20))  # 5 KB packed, 5 MB unpacked: above 4 x 1 MB
    volume = (cube() * 5).astype(np.uint16)
    return {
        "not_a_volume": (np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes(), "", 422,
                         "NIfTI header"),
        "truncated_gzip": (full[: len(full) // 2], "", 422, "truncated"),
        "four_d": (nifti_bytes(cube(3)), "", 422, "query parameter frame"),
        "frame_out_of_range": (nifti_bytes(cube(3)), "frame=5", 422, "out of range"),
        "two_d": (nifti_bytes(cube()[..., 0]), "", 422, "2D"),
        "all_nan": (nifti_bytes(np.full((16, 16, 16), np.nan)), "", 422, "no finite voxel"),
        "empty": (b"", "", 400, "empty"),
        "empty_zip": (empty_zip.getvalue(), "", 422, "no DICOM image"),
        "zip_without_series": (text_zip.getvalue(), "", 422, "no DICOM image"),
        "zip_with_two_series": (dicom_zip(volume, series=2), "", 422, "2 DICOM series"),
        "zip_bomb": (bomb.getvalue(), "", 413, "unpacked zip"),
        "broken_zip": (dicom_zip(volume)[:3000], "", 422, "zip"),
        "negative_frame": (full, "frame=-1", 422, "frame"),
    }


def test_bad_uploads_are_named_and_the_server_goes_on(server, dicom_zip, real_volume):
    for name, (body, query, status, words) in bad_uploads(dicom_zip).items():
        for route in ("/v1/segment", "/v1/embed"):
            code, answer = request(server.url + route, body, query)
            assert (code, set(answer)) == (status, {"error", "detail"}), (name, route, answer)
            assert words.lower() in answer["detail"].lower(), (name, route, answer)
    assert Client(server.url).segment(real_volume).volumes_ml  # still serving


def raw_post(port: int, headers: str, body: bytes) -> tuple[int, dict]:
    """Send a request by hand (the body may stop short) and read the answer (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST /v1/segment HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode() + body)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _length(answer):
            answer += sock.recv(65536)
    head, _, text = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(text)


def _length(answer: bytes) -> int:
    lines = answer.partition(b"\r\n\r\n")[0].decode().lower().splitlines()
    return next(int(line.split(":")[1]) for line in lines if line.startswith("content-length:"))


def test_too_large_uploads_get_413(server):
    # Announced: rejected before the body is read.
    code, answer = raw_post(server.port, f"Content-Length: {2 * 2**20}\r\n", b"")
    assert code == 413 and "limit of 1 MB" in answer["detail"]
    # Not announced (chunked): rejected once more than the limit arrived.
    chunk = b"\x1f\x8b" + bytes(2**20)
    code, answer = raw_post(server.port, "Transfer-Encoding: chunked\r\n", f"{len(chunk):x}\r\n".encode() + chunk)
    assert code == 413 and "limit of 1 MB" in answer["detail"]
    assert Client(server.url).health()["status"] == "ok"


def test_four_d_with_a_frame_is_segmented(server, tmp_path):
    path = tmp_path / "series.nii.gz"
    path.write_bytes(nifti_bytes(cube(3)))
    labels = nib.Nifti1Image.from_bytes(gzip.decompress(Client(server.url).segment(path, frame=1).data))
    assert labels.shape == (16, 16, 16)


def test_form_without_file_and_unknown_routes(server):
    form = b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--b--\r\n"
    code, answer = request(server.url + "/v1/segment", form, content_type="multipart/form-data; boundary=b")
    assert code == 400 and "'file'" in answer["detail"]
    assert request(server.url + "/v2/nothing", method="GET")[0] == 404
    assert request(server.url + "/v1/segment", method="GET")[0] == 405


def test_client_raises_the_servers_message(server, tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("not a volume")
    with pytest.raises(ServeError, match="notes.nii.gz: .*NIfTI header") as caught:
        Client(server.url).segment(path)
    assert caught.value.status == 422 and caught.value.error == "invalid volume"
    big = tmp_path / "big.nii.gz"
    big.write_bytes(b"\x1f\x8b" + bytes(8 * 2**20))  # the server closes while the client still sends
    with pytest.raises(ServeError, match="limit of 1 MB") as caught:
        Client(server.url, retries=0).segment(big)
    assert caught.value.status == 413


def test_client_retries_then_gives_up_on_a_closed_port():
    from dinov2.serve.process import free_port

    with pytest.raises(ServeError, match="no answer") as caught:
        Client(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.01).health()
    assert caught.value.status == 0
