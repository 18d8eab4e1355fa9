"""The learning table and SVG: losses against their uniform lines, read from training_metrics.json."""

import json
import math

import pytest

from dinov2.train import curves

LN_K = math.log(128)


def write_run(tmp_path, ratios):
    """A metrics file whose DINO / iBOT / teacher-entropy ratios follow ``ratios`` (one per period)."""
    lines = []
    for i, r in enumerate(ratios):
        lines.append(json.dumps({"iteration": 10 * i + 9, "dino_loss": r * LN_K, "dino_uniform_loss": LN_K,
                                 "ibot_loss": r * 0.5 * LN_K, "ibot_uniform_loss": 0.5 * LN_K,
                                 "teacher_entropy": r * LN_K, "koleo_loss": -1.0}))
    (tmp_path / "training_metrics.json").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_table_shows_each_loss_relative_to_its_uniform_value(tmp_path):
    run = write_run(tmp_path, [1.0] * 5 + [0.6] * 5)
    table = curves.learning_table(curves.read_metrics(run), rows=2, window=1)
    first, last = table.splitlines()[1:3]
    assert first.split() == ["10", "1.000", "1.000", "1.000"]
    assert last.split() == ["100", "0.600", "0.600", "0.600"]


def test_svg_draws_three_curves_and_the_uniform_line(tmp_path):
    svg = curves.learning_svg(curves.read_metrics(write_run(tmp_path, [1.0, 0.9, 0.8])), title="run")
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert svg.count("<polyline") == 3 and "uniform (collapsed)" in svg


def test_cli_writes_the_plot_and_names_a_missing_run(tmp_path, capsys):
    assert curves.main([str(write_run(tmp_path, [1.0, 0.7]))]) == 0
    assert (tmp_path / "learning_curves.svg").is_file() and "DINO loss / ln K" in capsys.readouterr().out
    assert curves.main([str(tmp_path / "nowhere")]) == 1
    assert "ERROR:" in capsys.readouterr().err


def test_records_without_uniform_lines_say_how_to_get_them():
    assert "monitor_collapse" in curves.learning_table([{"iteration": 0, "dino_loss": 5.0}])


@pytest.mark.parametrize("window", [1, 3])
def test_smoothing_is_a_trailing_mean(window):
    points = [(i, float(i)) for i in range(5)]
    assert curves._smoothed(points, window)[-1][1] == pytest.approx(sum(range(5 - window, 5)) / window)
