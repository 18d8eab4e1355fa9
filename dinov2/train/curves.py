"""Did a pretraining run learn? Its losses against their uniform lines, as a table and an SVG plot.

A falling total loss proves nothing (KoLeo alone falls). What shows learning is each loss
*relative to the value it takes for a uniform prediction* (``ln K`` for DINO, the masked share
times ``ln K`` for iBOT) and the teacher's entropy relative to ``ln K``: 1.0 is the collapsed
line, lower is learning. Both renderings read ``training_metrics.json`` (one JSON line per
logging period, written by :mod:`dinov2.train.metrics`).

Command line (prints the table, writes ``learning_curves.svg`` beside the metrics)::

    python -m dinov2.train.curves runs/my_run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from dinov2.train.metrics import METRICS_FILE
from dinov2.utils.entry_point import add_debug_flag, entry_point, start_entry_point
from dinov2.utils.errors import UsageError

# (record key, its uniform line's key, label, colour) of each plotted ratio.
RATIOS = (
    ("dino_loss", "dino_uniform_loss", "DINO loss / ln K", "#1f77b4"),
    ("ibot_loss", "ibot_uniform_loss", "iBOT loss / uniform", "#ff7f0e"),
    ("teacher_entropy", "dino_uniform_loss", "teacher entropy / ln K", "#2ca02c"),
)


def read_metrics(run_or_file: str | os.PathLike) -> list[dict]:
    """The records of a run folder's ``training_metrics.json`` (or of that file itself).

    Raises:
        FileNotFoundError: naming the file and what writes it.
        UsageError: a line that is not JSON (the message names the file and the line).
    """
    path = Path(run_or_file)
    path = path / METRICS_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give a pretraining --output-dir (train3d writes "
                                f"{METRICS_FILE} there at every logging period).")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}, line {number}: not a JSON record ({exc.msg}); give the "
                             f"{METRICS_FILE} that train3d wrote, or remove the damaged line.") from exc
    return records


def ratio_series(records: Sequence[dict]) -> dict[str, list[tuple[int, float]]]:
    """``label -> [(iteration, value / uniform value)]`` for each ratio the records hold."""
    series: dict[str, list[tuple[int, float]]] = {}
    for key, uniform_key, label, _ in RATIOS:
        points = [(int(r["iteration"]) + 1, float(r[key]) / float(r[uniform_key])) for r in records
                  if key in r and float(r.get(uniform_key) or 0.0) > 0.0]
        if points:
            series[label] = points
    return series


def _smoothed(points: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """Trailing mean over ``window`` periods (single periods of a small batch are noisy)."""
    out = []
    for i, (it, _) in enumerate(points):
        chunk = points[max(0, i - window + 1): i + 1]
        out.append((it, sum(v for _, v in chunk) / len(chunk)))
    return out


def learning_table(records: Sequence[dict], rows: int = 6, window: int = 5) -> str:
    """A few evenly spaced rows of each ratio (trailing mean over ``window`` periods).

    Args:
        records: the run's metrics records.
        rows: how many iterations to show (the last one always).
        window: logging periods averaged into each shown value.

    Returns:
        Plain text; a ratio of 1.00 is the uniform (collapsed) line.
    """
    series = {label: _smoothed(points, window) for label, points in ratio_series(records).items()}
    if not series:
        return "(no loss with a uniform line in these metrics: run with train.monitor_collapse=true)"
    labels = list(series)
    length = min(len(p) for p in series.values())
    picks = sorted({round(i * (length - 1) / max(rows - 1, 1)) for i in range(rows)})
    lines = [f"{'iteration':>9}  " + "  ".join(f"{label:>22}" for label in labels)]
    for i in picks:
        lines.append(f"{series[labels[0]][i][0]:>9}  " + "  ".join(f"{series[l][i][1]:>22.3f}" for l in labels))
    lines.append("(1.000 = the value of a uniform prediction, i.e. collapse; lower = learning)")
    return "\n".join(lines)


def learning_svg(records: Sequence[dict], title: str = "", window: int = 5, width: int = 640, height: int = 360) -> str:
    """An SVG line plot of the ratios over iterations with the uniform line at 1 (opens in any browser)."""
    series = {label: _smoothed(points, window) for label, points in ratio_series(records).items()}
    colours = {label: colour for _, _, label, colour in RATIOS}
    left, right, top, bottom = 56, 16, 28, 40
    x_max = max((p[-1][0] for p in series.values()), default=1)
    y_max = max(1.1, max((v for p in series.values() for _, v in p), default=1.0) * 1.02)
    sx = lambda it: left + (width - left - right) * it / max(x_max, 1)  # noqa: E731
    sy = lambda v: top + (height - top - bottom) * (1 - v / y_max)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{left}" y="18">{title}</text>']
    for tick in [i * 0.2 for i in range(int(y_max / 0.2) + 1)]:
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(tick):.1f}" y2="{sy(tick):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{sy(tick) + 4:.1f}" text-anchor="end">{tick:.1f}</text>')
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(1):.1f}" y2="{sy(1):.1f}" stroke="#d62728" '
                 f'stroke-dasharray="6 4"/><text x="{width - right}" y="{sy(1) - 4:.1f}" text-anchor="end" '
                 f'fill="#d62728">uniform (collapsed)</text>')
    for i in range(5):
        it = round(x_max * i / 4)
        parts.append(f'<text x="{sx(it):.1f}" y="{height - bottom + 16}" text-anchor="middle">{it}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">iteration</text>')
    for i, (label, points) in enumerate(series.items()):
        path = " ".join(f"{sx(it):.1f},{sy(v):.1f}" for it, v in points)
        parts.append(f'<polyline fill="none" stroke="{colours[label]}" stroke-width="2" points="{path}"/>'
                     f'<text x="{left + 8}" y="{height - bottom - 8 - 16 * i}" fill="{colours[label]}">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Print the learning table of a run and write ``learning_curves.svg`` beside its metrics."""
    parser = argparse.ArgumentParser(prog="python -m dinov2.train.curves", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a pretraining --output-dir (or its training_metrics.json)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    start_entry_point(tune_allocator=False)
    records = read_metrics(args.run)
    run = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent
    print(learning_table(records))
    svg = run / "learning_curves.svg"
    svg.write_text(learning_svg(records, title=f"{run.name}: losses and teacher entropy against their uniform lines"))
    print(f"Wrote {svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
