"""matplotlib, imported on first use with a headless backend (an optional extra)."""

from __future__ import annotations

from pathlib import Path

from .errors import PlotError


def pyplot():
    """``matplotlib.pyplot`` with the Agg backend (no display needed on a cluster node).

    Raises:
        PlotError: matplotlib is not installed (names the package to install).
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotError("matplotlib is not installed: pip install matplotlib (the plots are an optional extra; "
                        "python -m dinov2.train.curves RUN writes an SVG of the learning curves without it).") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG through a temporary name (a killed run leaves no half-written picture)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".partial.png")
    fig.savefig(partial, dpi=110, bbox_inches="tight")
    partial.replace(path)
    fig.clf()
    return path
