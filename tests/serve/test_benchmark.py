"""``python scripts/benchmark.py serve`` runs end to end on a tiny setting and prints its table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARK_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark.py"


def test_serve_benchmark_prints_a_table(capsys):
    spec = importlib.util.spec_from_file_location("benchmark_under_test", BENCHMARK_SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["serve", "--requests", "3", "--clients", "2", "--size", "32", "--window", "16",
                       "--embed-dim", "32", "--server-threads", "1"])
    assert [r["endpoint"] for r in rows] == ["segment", "embed"]
    assert all(r["errors"] == 0 and r["rps"] > 0 and 0 < r["p50"] <= r["p95"] for r in rows)
    assert "| segment | 3 | 2 |" in capsys.readouterr().out
