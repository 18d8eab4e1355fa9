"""The PNGs of finetuning runs: segmentation (``results.json`` curves) and the linear-probe grid (``metrics.jsonl``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .backend import pyplot, save


def segmentation_figure(results: dict, path: Path) -> Path:
    """Training loss (log scale), LR and validation mean Dice over iterations, the best iteration marked.

    Args:
        results: a segmentation ``results.json`` (``curves.train``: ``iteration``, ``loss``, ``lr``;
            ``curves.validation``: ``iteration``, ``mean_dice``; ``best.iteration``).
        path: the PNG to write.
    """
    plt = pyplot()
    curves = results.get("curves", {})
    train, val = curves.get("train", []), curves.get("validation", [])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].plot([r["iteration"] for r in train], [r["loss"] for r in train], lw=1.2)
    if train and all(r["loss"] > 0 for r in train):
        axes[0].set_yscale("log")
    axes[0].set(title="training loss", xlabel="iteration")
    axes[1].plot([r["iteration"] for r in train], [r["lr"] for r in train], lw=1.2)
    axes[1].set(title="learning rate", xlabel="iteration")
    axes[2].plot([r["iteration"] for r in val], [r["mean_dice"] for r in val], marker="o", ms=3, lw=1.2)
    best = results.get("best") or {}
    if "iteration" in best and "mean_dice" in best:
        axes[2].axvline(best["iteration"], color="#2ca02c", ls=":", label=f"best: {best['mean_dice']:.3f}")
        axes[2].legend(fontsize=8)
    axes[2].set(title="validation mean foreground Dice", xlabel="iteration", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results.get('head', 'segmentation')} on {results.get('dataset', '?')}")
    fig.tight_layout()
    return save(fig, path)


def probe_grid_figure(history: Sequence[dict], best_name: str | None, path: Path) -> Path:
    """Validation accuracy of every head of the probe grid over iterations; the chosen head in bold.

    Args:
        history: the ``metrics.jsonl`` lines (``iteration`` and ``val_accuracy`` per head name).
        best_name: the chosen head (``results.json`` ``best_classifier.name``), or None.
        path: the PNG to write.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = sorted({name for entry in history for name in entry.get("val_accuracy", {})})
    for name in names:
        points = [(e["iteration"], e["val_accuracy"][name]) for e in history if name in e.get("val_accuracy", {})]
        chosen = name == best_name
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=2.4 if chosen else 0.8,
                alpha=1.0 if chosen else 0.5, label=f"{name} (chosen)" if chosen else None)
    ax.set(xlabel="iteration", ylabel="validation accuracy", ylim=(0, 1),
           title=f"Linear-probe grid: {len(names)} heads")
    if best_name in names:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save(fig, path)
