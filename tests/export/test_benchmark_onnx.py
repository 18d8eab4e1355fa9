"""``python scripts/benchmark.py onnx`` runs both runtimes on the real volume and prints its table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_onnx_benchmark_smoke(capsys):
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPTS / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.COMMANDS["onnx"](["--arch", "vit_tiny_3d", "--patch-size", "8", "--window", "16", "--crop", "24",
                                     "--rounds", "1", "--sw-batch-size", "2"])
    table = capsys.readouterr().out
    assert "| PyTorch eager |" in table and "| ONNX Runtime |" in table and "load average" in table
    assert result["windows"] == 8 and result["max_prob_diff"] < 1e-4  # 2 windows of 16 per axis of 24
