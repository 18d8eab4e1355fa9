"""The service's parts without a server: volumes, windows, the queue, channel checks, the missing extra."""

from __future__ import annotations

import asyncio
import http.server
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dinov2.serve import Client, ServeError
from dinov2.serve.errors import ServiceError, service_error
from dinov2.serve.inference import ServedModel, class_volumes_ml, segment_nifti, tile_windows
from dinov2.serve.jobs import InferenceQueue


def test_class_volumes_in_ml(tiny_preset_factory):
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[:2] = 1
    affine = np.diag([2.0, 2.0, 2.5, 1.0])  # 10 mm³ per voxel
    assert class_volumes_ml(labels, affine, tiny_preset_factory()) == {"bright": 0.32}
    regions = tiny_preset_factory(classes=None, loss="dice_sigmoid", regions={"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]})
    labels[0] = 4
    assert class_volumes_ml(labels, affine, regions) == {"WT": 0.32, "TC": 0.32, "ET": 0.16}


def test_tile_windows_cover_the_volume_once():
    volume = torch.arange(2 * 5 * 4 * 3, dtype=torch.float32).reshape(2, 5, 4, 3)
    windows = tile_windows(volume, (4, 4, 2))
    assert windows.shape == (4, 2, 4, 4, 2)
    assert windows.sum() == volume.sum() and windows[0, 1, 0, 0, 0] == volume[1, 0, 0, 0]


def test_queue_times_out_rejects_when_full_and_keeps_the_slot_until_the_job_ends():
    release = threading.Event()

    async def scenario():
        queue = InferenceQueue(concurrency=1, max_queue=0, timeout_s=0.2)
        with pytest.raises(ServiceError) as timeout:
            await queue.run(release.wait)
        assert timeout.value.status == 504 and queue.state()["running"] == 1  # the thread still runs
        with pytest.raises(ServiceError) as busy:
            await queue.run(lambda: 1)
        assert busy.value.status == 503 and busy.value.headers["Retry-After"]
        release.set()
        await asyncio.sleep(0.1)
        assert queue.state()["running"] == 0 and await queue.run(lambda: 42) == 42
        queue.shutdown()

    asyncio.run(scenario())


def test_queue_runs_at_most_concurrency_jobs():
    active, peak, lock = [0], [0], threading.Lock()

    def job():
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1

    async def scenario():
        queue = InferenceQueue(concurrency=2, max_queue=16, timeout_s=30)
        await asyncio.gather(*(queue.run(job) for _ in range(8)))
        queue.shutdown()

    asyncio.run(scenario())
    assert peak[0] == 2


def test_wrong_channel_count_is_a_422_in_words(tiny_preset_factory, tmp_path):
    path = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16), np.float32), np.eye(4)), path)
    served = ServedModel(None, tiny_preset_factory(modalities=["T1w", "FLAIR"]), {}, torch.device("cpu"), "fp32", {},
                         Path("m.pth"))
    with pytest.raises(ValueError) as caught:
        segment_nifti(served, path, tmp_path / "out.nii.gz")
    answer = service_error(caught.value, "scan.nii.gz")
    assert answer.status == 422 and answer.detail.startswith("scan.nii.gz: ") and "takes 2 channels" in answer.detail
    assert str(tmp_path) not in answer.detail  # no server paths in answers


def test_missing_extra_is_one_error_line(tmp_path):
    code = ("import sys; sys.modules['fastapi'] = None; from dinov2.serve.__main__ import main; "
            f"sys.exit(main(['--checkpoint', '{tmp_path / 'x.pth'}']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR:")]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert len(errors) == 1 and "pip install 'dinov2-3d[serve]'" in errors[0]


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    """503 for the first two requests, then 200 with a JSON body."""

    calls = 0

    def do_GET(self):  # noqa: N802 - the standard library's name
        type(self).calls += 1
        status = 503 if self.calls <= 2 else 200
        body = json.dumps({"error": "server busy", "detail": "retry"} if status == 503 else {"status": "ok"}).encode()
        self.send_response(status)
        self.send_header("Retry-After", "0.05")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_client_retries_503_then_succeeds():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert Client(url, retries=3).health() == {"status": "ok"} and _FlakyHandler.calls == 3
        _FlakyHandler.calls = 0
        with pytest.raises(ServeError, match="HTTP 503 server busy: retry"):
            Client(url, retries=1).health()
    finally:
        server.shutdown()
