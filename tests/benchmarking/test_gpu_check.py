"""scripts/gpu_check.py --cpu-smoke: every stage gives its rows, a failing, hanging or out-of-memory stage
is a row of the table (never the end of it), and the time budget is kept.

The smoke runs every stage for real at toy sizes on the CPU (the CUDA tests are collected and
skipped); the GPU figures themselves can only come from a GPU machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


def _load_driver():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


gpu_check = _load_driver()


def _run_smoke(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out), *args],
                            capture_output=True, text=True, timeout=600, env=env)
    assert (out / "gpu_check.json").is_file(), result.stderr[-3000:]
    return result, json.loads((out / "gpu_check.json").read_text())["rows"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Every stage at toy sizes; the largest step batch runs out of memory (injected)."""
    out = tmp_path_factory.mktemp("gpu_check")
    result, rows = _run_smoke(out, "--inject", "step=oom")
    return result, rows, (out / "gpu_check.md").read_text()


def _rows(rows: list[dict], stage: str) -> list[dict]:
    return [r for r in rows if r["stage"] == stage]


def test_every_stage_reports_its_cases(smoke):
    result, rows, report = smoke
    assert [r["stage"] for r in rows] == sorted((r["stage"] for r in rows), key=gpu_check.STAGES.index)
    assert {r["stage"] for r in rows} == set(gpu_check.STAGES)
    tests = _rows(rows, "tests")
    assert {r["case"].split("::")[0] for r in tests} == {
        "test_sdpa", "test_autocast_losses", "test_fsdp_one_gpu", "test_checkpoint_resume"}
    if not torch.cuda.is_available():
        assert all(r["status"].startswith("skipped: needs a CUDA GPU") for r in tests)
    (peak,) = _rows(rows, "peak")
    assert peak["status"] == "ok" and peak["peak_gflops"] > 0 and peak["machine"]["torch"] == torch.__version__
    step = _rows(rows, "step")
    assert [r["case"] for r in step] == ["batch 2, eager", "batch 4, eager", "batch 2, compile", "batch 4, compile"]
    for row in (step[0], step[2]):
        assert row["status"] == "ok" and row["it_per_s"] > 0 and row["flops_per_it"] > 0
        assert row["mfu"] == pytest.approx(row["flops_per_it"] * row["it_per_s"] / 1e9 / peak["peak_gflops"])
    assert "compiled graphs" in step[2]["detail"]
    loop = _rows(rows, "loop")
    assert [r["case"] for r in loop] == ["batch 2, augment_on_device=false", "batch 2, augment_on_device=true"]
    for row in loop:
        assert row["status"] == "ok" and row["samples_per_s"] > 0 and "mfu" in row
    loader = _rows(rows, "loader")
    assert [r["case"] for r in loader] == ["1 worker"]
    assert loader[0]["status"] == "ok" and loader[0]["samples_per_s"] > 0
    # the Markdown table holds one line per row, after its header and separator
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)
    assert report in result.stdout
    assert result.returncode == 0


def test_out_of_memory_is_a_row(smoke):
    _, rows, _ = smoke
    oom = [r for r in _rows(rows, "step") if r["case"].startswith("batch 4")]
    assert [r["status"] for r in oom] == ["OOM", "OOM"]
    assert all("mfu" not in r for r in oom)


def test_failing_and_hanging_stages_are_rows_and_the_exit_code_says_so(tmp_path):
    result, rows = _run_smoke(tmp_path, "--stages", "peak,loader", "--inject", "peak=error", "--inject", "loader=hang",
                              "--stage-budget", "loader=3")
    assert result.returncode == 1
    assert [(r["stage"], r["case"]) for r in rows] == [("peak", "fp32 matmul 256²"), ("loader", "1 worker")]
    assert rows[0]["status"] == "failed: RuntimeError: injected failure (--inject peak=error)"
    assert all(r["status"].startswith("timeout after ") for r in rows[1:])
    assert "| loader | 1 worker | timeout after " in result.stdout


def test_stages_past_the_total_budget_are_skipped_rows(tmp_path):
    result, rows = _run_smoke(tmp_path, "--stages", "peak,step", "--total-seconds", "0")
    assert result.returncode == 0
    assert [r["stage"] for r in rows] == ["peak"] + ["step"] * 4
    assert all(r["status"] == "skipped: time budget spent (0 s in all)" for r in rows)


def test_shell_wrapper_runs_the_check_and_writes_to_OUT(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(SCRIPT.with_suffix(".sh")), "--cpu-smoke", "--stages", "peak"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} == {"gpu_check.md", "gpu_check.json", "gpu_check.log"}
    assert (tmp_path / "gpu_check.md").read_text() in result.stdout
    assert json.loads((tmp_path / "gpu_check.json").read_text())["rows"][0]["status"] == "ok"


def test_cases_a_stage_did_not_report_become_rows(tmp_path):
    stage = gpu_check.Stage("loader", 10.0, ({"case": "4 workers"}, {"case": "8 workers"}))
    rows_path = tmp_path / "loader.jsonl"
    rows_path.write_text(json.dumps({"stage": "loader", "case": "8 workers", "status": "ok"}) + "\n")
    killed = gpu_check.Outcome(returncode=None, seconds=10.2, log_tail="")
    crash = "RuntimeError: CUDA error: an illegal memory access"
    crashed = gpu_check.Outcome(returncode=1, seconds=3.0, log_tail=crash)
    rows = gpu_check.stage_rows(stage, rows_path, killed)  # in the stage's case order, whatever was written first
    assert [(r["case"], r["status"]) for r in rows] == [("4 workers", "timeout after 10 s"), ("8 workers", "ok")]
    assert gpu_check.stage_rows(stage, rows_path, crashed)[0]["status"] == f"failed: {crash}"
    table = gpu_check.format_table([{"stage": "tests", "case": "t[a|b]", "status": "passed"}])
    assert "t[a\\|b]" in table  # a pipe in a test id does not break the table


def test_a_killed_pytest_still_gives_the_tests_it_finished(tmp_path):
    stage = gpu_check.Stage("tests", 70.0, ())
    (tmp_path / "tests.log").write_text(
        "tests/cuda/test_sdpa.py::test_fused[flash-217] PASSED                  [ 11%]\n"
        "tests/cuda/test_sdpa.py::test_fused[flash-28] FAILED                   [ 22%]\n"
        "tests/cuda/test_fsdp_one_gpu.py::test_fsdp[fp32-1e-05] ")  # hung here, killed
    killed = gpu_check.Outcome(returncode=None, seconds=70.4, log_tail="")
    rows = gpu_check.stage_rows(stage, tmp_path / "tests.jsonl", killed)  # no JUnit report: pytest never finished
    assert [(r["case"], r["status"]) for r in rows] == [
        ("test_sdpa::test_fused[flash-217]", "passed"), ("test_sdpa::test_fused[flash-28]", "failed (see gpu_check.log)"),
        ("pytest -m cuda tests/cuda (the rest)", "timeout after 70 s")]
