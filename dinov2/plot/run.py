"""``plot_run``: find what a run folder holds and render its PNGs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dinov2.train.curves import read_metrics
from dinov2.train.metrics import METRICS_FILE

from .errors import PlotError
from .finetuning import probe_grid_figure, segmentation_figure
from .pretraining import pretraining_figures

PLOTS_DIR = "plots"
logger = logging.getLogger("dinov2.plot")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PlotError(f"{path} is not readable JSON ({exc}); re-run the evaluation that wrote it.") from exc


def _json_lines(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise PlotError(f"{path} has a damaged line ({exc}); re-run the linear probe that wrote it.") from exc


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Render every PNG the run folder's files allow.

    Args:
        run_dir: a pretraining ``--output-dir`` (``training_metrics.json``), a segmentation one
            (``results.json`` with ``curves``) or a linear-probe one (``metrics.jsonl``).
        out_dir: where the PNGs go (default ``run_dir/plots``).

    Returns:
        The written PNG paths.

    Raises:
        PlotError: not a folder, nothing to plot in it, a damaged file, or matplotlib missing.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir} is not a folder: pass the --output-dir of a pretraining, segmentation or "
                        "linear-probe run.")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / PLOTS_DIR
    written: list[Path] = []
    if (run_dir / METRICS_FILE).is_file():
        try:
            records = read_metrics(run_dir)
        except (FileNotFoundError, ValueError) as exc:
            raise PlotError(str(exc)) from exc
        written += pretraining_figures(records, run_dir, out_dir)
    results = _json(run_dir / "results.json") if (run_dir / "results.json").is_file() else {}
    if "curves" in results:
        written.append(segmentation_figure(results, out_dir / "finetuning.png"))
    if (run_dir / "metrics.jsonl").is_file():
        best = (results.get("best_classifier") or {}).get("name")
        written.append(probe_grid_figure(_json_lines(run_dir / "metrics.jsonl"), best, out_dir / "probe_grid.png"))
    if not written:
        raise PlotError(f"Nothing to plot in {run_dir}: no {METRICS_FILE} (pretraining), results.json with curves "
                        "(segmentation) or metrics.jsonl (linear probe). Pass a run's --output-dir.")
    return written


def plot_at_end(run_dir: str | os.PathLike) -> list[Path]:
    """What a run does when it ends: write its PNGs, or say in one log line why not.

    A run's results are complete before this is called, so a plotting problem (matplotlib not
    installed, or anything else) is logged with the command that retries it and never fails the
    run.

    Returns:
        The written PNG paths (empty when none were written).
    """
    try:
        written = plot_run(run_dir)
    except PlotError as exc:
        logger.info("No PNG curves: %s", " ".join(str(exc).split()))
        return []
    except Exception as exc:  # noqa: BLE001 - the run is done; say what failed and how to retry
        logger.warning("Could not write the PNG curves (%s: %s); the run's results are complete. Retry with "
                       "python -m dinov2.plot %s", type(exc).__name__, exc, run_dir)
        return []
    logger.info("Curves as PNG in %s (python -m dinov2.plot %s redraws them)", written[0].parent, run_dir)
    return written
