"""``python scripts/benchmark.py heads`` times every head and finetunes each on the sample set: one table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_heads_benchmark_prints_size_speed_and_dice_in_one_table(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPTS / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.COMMANDS["heads"]([
        "--arch", "vit_tiny_3d", "--patch-size", "8", "--window", "32", "--rounds", "1", "--heads", "Linear,UNetFusion",
        "--finetune-arch", "vit_tiny_3d", "--finetune-iterations", "4", "--finetune-eval-every", "4",
        "--finetune-warmup", "1", "--finetune-override", "model.backbone_kwargs={embed_dim: 32, depth: 4, num_heads: 2}",
        "--data-dir", str(tmp_path / "data"), "--keep-runs", str(tmp_path / "runs")])
    table = capsys.readouterr().out
    assert table.startswith("Size and speed:") and "Test Dice: the same short finetune" in table
    assert "| test Dice (mean fg) | test Dice (ventricles / grey matter / other brain) |" in table
    assert [r["head"] for r in rows] == ["backbone (4 taps)", "Linear", "UNetFusion"]
    for row in rows[1:]:
        assert 0.0 <= row["dice"] <= 1.0 and set(row["class_dice"]) == {"ventricles", "grey matter", "other brain"}
        assert f"| {row['head']} |" in table and f"| {row['dice']:.3f} |" in table
        assert (tmp_path / "runs" / row["head"] / "results.json").is_file()
    assert "dice" not in rows[0]  # the backbone row is timed only
