"""A rank that fails ends the whole torchrun job, non-zero and with its error visible, never a hang.

Two failure shapes on gloo:

* under ``torchrun --nproc_per_node 2``, rank 1 raises while rank 0 waits in an all-reduce:
  torchrun's agent sees rank 1 exit non-zero and stops rank 0; our code must not keep rank 0
  alive (no handler swallowing the signal).
* a rank that never arrives: only the process-group timeout given to
  :func:`dinov2.distributed.init_distributed` can end the other rank's wait (checked in-process
  on the rendezvous, which the same timeout bounds).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time

import pytest

from dinov2 import distributed

# Generous: two processes importing torch on a loaded 2-core machine take several seconds.
DEADLINE_S = 90

WORKER = textwrap.dedent("""
    import sys

    import torch

    from dinov2 import distributed

    ctx = distributed.init_distributed("cpu", timeout_minutes=float(sys.argv[1]))
    assert ctx.world_size == 2 and ctx.backend == "gloo"
    if ctx.rank == 1:
        raise RuntimeError("rank 1 failed on purpose")
    distributed.all_reduce_mean(torch.ones(3))  # rank 0 waits for rank 1 here
    print("rank 0 finished the collective", flush=True)
    distributed.shutdown_distributed()
""")


def _torchrun(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--monitor-interval", "0.5", str(script), *args]
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE_S + 60)
    return result, time.monotonic() - start


@pytest.mark.slow
@pytest.mark.torchrun
def test_raising_rank_ends_the_job(tmp_path):
    # A 10-minute group timeout: the job must end through the failing rank, not the timeout.
    result, elapsed = _torchrun(tmp_path, "10")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert elapsed < DEADLINE_S, f"took {elapsed:.0f} s"
    assert "Traceback" in output and "RuntimeError: rank 1 failed on purpose" in output, output[-3000:]
    assert "rank 0 finished the collective" not in output


def test_group_timeout_bounds_a_wait_for_a_missing_rank(monkeypatch):
    # A rank that never shows up: the waiting rank must fail after the group timeout given to
    # init_distributed (3 s here), not wait for ever. In-process, so it costs no torch import;
    # the same timeout bounds gloo's collectives (measured: a rank hung outside an all-reduce
    # under torchrun ends the job in ~6 s with timeout_minutes=0.1).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="(?i)timed out"):
        distributed.init_distributed("cpu", timeout_minutes=0.05)
    assert time.monotonic() - start < 30
    assert not distributed.is_enabled()
