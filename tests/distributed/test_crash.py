"""A rank that fails ends the whole torchrun job, non-zero and with its error visible, never a hang.

Two failure shapes, each under ``torchrun --nproc_per_node 2`` on gloo:

* rank 1 raises while rank 0 waits in an all-reduce: torchrun's agent sees rank 1 exit non-zero
  and stops rank 0; our code must not keep rank 0 alive (no handler swallowing the signal).
* rank 1 hangs (alive, never joining the collective): only the process-group timeout given to
  :func:`dinov2.distributed.init_distributed` can end rank 0's wait; rank 0 then fails and the
  agent stops rank 1.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

# Generous: two processes importing torch on a loaded 2-core machine take several seconds.
DEADLINE_S = 90

WORKER = textwrap.dedent("""
    import sys
    import time

    import torch

    from dinov2 import distributed

    timeout_minutes, mode = float(sys.argv[1]), sys.argv[2]
    ctx = distributed.init_distributed("cpu", timeout_minutes=timeout_minutes)
    assert ctx.world_size == 2 and ctx.backend == "gloo"
    if ctx.rank == 1:
        if mode == "raise":
            raise RuntimeError("rank 1 failed on purpose")
        time.sleep(600)  # alive but never joins the collective below
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
def test_raising_rank_ends_the_job(tmp_path):
    # A 10-minute group timeout: the job must end through the failing rank, not the timeout.
    result, elapsed = _torchrun(tmp_path, "10", "raise")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert elapsed < DEADLINE_S, f"took {elapsed:.0f} s"
    assert "Traceback" in output and "RuntimeError: rank 1 failed on purpose" in output, output[-3000:]
    assert "rank 0 finished the collective" not in output


@pytest.mark.slow
def test_group_timeout_ends_a_wait_for_a_hung_rank(tmp_path):
    # 0.1 min = 6 s: far below the 600 s rank 1 sleeps, so only the timeout can end the job.
    result, elapsed = _torchrun(tmp_path, "0.1", "hang")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert elapsed < DEADLINE_S, f"took {elapsed:.0f} s"
    assert "rank 0 finished the collective" not in output
    assert "Traceback" in output and "timed out" in output.lower(), output[-3000:]
