"""Timeout (504) and a full queue (503) over loopback, on a server with a tight time limit and no queue."""

from __future__ import annotations

import gzip
import json
import time
import urllib.error
import urllib.request

import nibabel as nib
import numpy as np
import pytest

from dinov2.serve import Client
from dinov2.serve.process import ServerProcess

TIMEOUT_S = 0.3


@pytest.fixture(scope="module")
def strict_server(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("strict") / "server.log"
    process = ServerProcess(checkpoint, log, ["--concurrency", "1", "--max-queue", "0", "--timeout-s", str(TIMEOUT_S),
                                              "--device", "cpu", "--threads", "1"])
    try:
        yield process.wait_ready(90)
    finally:
        process.stop()


def slow_volume() -> bytes:
    """A 64³ volume: a few seconds of sliding windows for the tiny model, well past the time limit."""
    data = np.random.default_rng(0).uniform(0, 100, (64, 64, 64)).astype(np.float32)
    return gzip.compress(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes(), compresslevel=1)


def post(url: str, body: bytes):
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.headers, {}
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read())


def test_timeout_then_busy_while_the_job_still_runs(strict_server):
    body, url = slow_volume(), strict_server.url + "/v1/segment"
    start = time.monotonic()
    code, _, answer = post(url, body)
    assert code == 504 and "0.3 s" in answer["detail"] and time.monotonic() - start < 5
    # The timed-out job still holds the only slot, and nobody may wait: 503 with Retry-After.
    code, headers, answer = post(url, body)
    assert code == 503 and answer["error"] == "server busy" and headers["Retry-After"]
    client = Client(strict_server.url)
    assert client.health()["running"] == 1  # the event loop answers while the worker thread computes
    deadline = time.monotonic() + 60
    while client.health()["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.health() == {"status": "ok", "running": 0, "queued": 0, "concurrency": 1}

