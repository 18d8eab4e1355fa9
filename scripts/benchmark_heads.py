"""Segmentation heads side by side: ``python scripts/benchmark.py heads``.

Every head (``--heads``; default all of :data:`HEAD_NAMES`) is put on one randomly initialised,
frozen backbone (``--arch``, default ViT-B/16) with its default options from
``dinov2/configs/eval/segmentation_default.yaml``. Reported per head: trainable parameters
(head + modality merge) and the seconds of one forward pass of a ``--window``³ window (batch 1,
fp32, inference mode), median of ``--rounds`` rounds. The heads alternate within each round (the
order reversed every other round) so drift in the machine's load hits them alike; time is CPU
seconds of this process (``time.process_time``, with ``--threads 1`` robust to other load) and
wall seconds beside it. A ``backbone (4 taps)`` row times the frozen features alone (what every
feature-reading head pays; the adapter heads run the blocks themselves).

Usage::

    python scripts/benchmark.py heads                                    # ViT-B/16, 96³, 1 thread
    python scripts/benchmark.py heads --arch vit_small_3d --window 64 --rounds 3
    python scripts/benchmark.py heads --heads UNETR,DPT --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Sequence

import torch

BACKBONE_ROW = "backbone (4 taps)"


def get_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = argparse.ArgumentParser(prog="python scripts/benchmark.py heads", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vit_base_3d", help="backbone registry name (random init, frozen)")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--window", type=int, default=96, help="cubic window side (a multiple of every head's requirement)")
    p.add_argument("--heads", default=None, help="comma-separated head names (default: all)")
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=14, help="output channels (BTCV: 14)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per head (median reported)")
    p.add_argument("--threads", type=int, default=1)
    return p


def head_names(text: str | None) -> list[str]:
    """``--heads`` → canonical head names (all by default)."""
    from dinov2.eval.segmentation.model import HEAD_NAMES, canonical_head_name

    if text is None:
        return list(HEAD_NAMES)
    return [canonical_head_name(name.strip()) for name in text.split(",") if name.strip()]


def build_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """One segmentation model per head, all on the same frozen backbone, in eval mode."""
    from omegaconf import OmegaConf

    from dinov2.eval.segmentation.model import build_segmentation_model, head_options
    from dinov2.models import build_model
    from dinov2.utils.config import packaged_config_path

    model_cfg = OmegaConf.load(packaged_config_path("eval/segmentation_default"))["model"]
    torch.manual_seed(0)
    backbone = build_model(args.arch, patch_size=args.patch_size, img_size=args.window)
    return {name: build_segmentation_model(backbone, name, args.in_channels, args.classes,
                                           head_options(model_cfg, name)).eval()
            for name in head_names(args.heads)}


def forwards(models: dict[str, torch.nn.Module], window: torch.Tensor) -> dict[str, Callable[[], None]]:
    """A no-argument forward per row: the backbone's taps alone, then each head's whole model."""
    steps = {BACKBONE_ROW: lambda: next(iter(models.values())).features(window)}
    steps.update({name: (lambda m=model: m(window)) for name, model in models.items()})
    return steps


def alternate(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, dict[str, list[float]]]:
    """CPU and wall seconds of each step per round; the order flips every round."""
    seconds = {name: {"cpu": [], "wall": []} for name in steps}
    with torch.inference_mode():
        for step in steps.values():  # warm-up: allocator, oneDNN primitives
            step()
        for r in range(rounds):
            for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
                cpu, wall = time.process_time(), time.perf_counter()
                steps[name]()
                seconds[name]["cpu"].append(time.process_time() - cpu)
                seconds[name]["wall"].append(time.perf_counter() - wall)
    return seconds


def trainable_parameters(model: torch.nn.Module) -> int:
    """Parameters that a frozen-backbone finetuning trains (head + modality merge)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def rows_of(models: dict[str, torch.nn.Module], seconds: dict[str, dict[str, list[float]]]) -> list[dict]:
    """One row per timed step: name, trainable parameters (None for the backbone row), medians."""
    return [{"head": name, "params": trainable_parameters(models[name]) if name in models else None,
             "cpu_s": statistics.median(s["cpu"]), "wall_s": statistics.median(s["wall"])}
            for name, s in seconds.items()]


def format_table(rows: list[dict], args: argparse.Namespace, load: tuple[float, float]) -> str:
    """Markdown table for docs/benchmarks.md."""
    lines = [f"{args.arch} patch {args.patch_size} (random init, frozen), window {args.window}³, batch 1, "
             f"{args.in_channels} channel(s), {args.classes} classes, fp32, {args.threads} thread(s); median of "
             f"{args.rounds} alternating rounds; load average {load[0]:.2f} before, {load[1]:.2f} after.", "",
             "| head | trainable params (M) | s / window (CPU) | s / window (wall) |", "|---|---:|---:|---:|"]
    for r in rows:
        params = "–" if r["params"] is None else f"{r['params'] / 1e6:.2f}"
        lines.append(f"| {r['head']} | {params} | {r['cpu_s']:.2f} | {r['wall_s']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Build, time, print the table, return its rows."""
    args = get_parser().parse_args(argv)
    if min(args.window, args.rounds, args.threads, args.in_channels, args.classes) < 1:
        raise SystemExit("--window, --rounds, --threads, --in-channels and --classes must be >= 1")
    torch.set_num_threads(args.threads)
    models = build_models(args)
    window = torch.randn(1, args.in_channels, args.window, args.window, args.window,
                         generator=torch.Generator().manual_seed(0))
    before = os.getloadavg()[0]
    rows = rows_of(models, alternate(forwards(models, window), args.rounds))
    print(format_table(rows, args, (before, os.getloadavg()[0])))
    return rows


if __name__ == "__main__":
    main()
