"""Segmentation heads side by side: ``python scripts/benchmark.py heads``.

Two parts, one table (one row per head):

**Size and speed.** Every head (``--heads``; default all of :data:`HEAD_NAMES`) is put on one
randomly initialised, frozen backbone (``--arch``, default ViT-B/16) with its default options from
``dinov2/configs/eval/segmentation_default.yaml``. Reported per head: trainable parameters
(head + modality merge) and the seconds of one forward pass of a ``--window``³ window (batch 1,
fp32, inference mode), median of ``--rounds`` rounds. The heads alternate within each round (the
order reversed every other round) so drift in the machine's load hits them alike; time is CPU
seconds of this process (``time.process_time``, with ``--threads 1`` robust to other load) and
wall seconds beside it. A ``backbone (4 taps)`` row times the frozen features alone (what every
feature-reading head pays; the adapter heads run the blocks themselves).

**Accuracy after a short finetune** (``--no-finetune`` skips it). Every head gets the same short
finetune (``python -m dinov2.eval.segmentation``, in this process) on the embedded brain-tissue
sample set (``python -m dinov2.sample_data --labels tissue``: 5 training, 1 validation, 2 test
variants of one real T1), with the same backbone (``--finetune-arch`` random init, or a teacher
given with ``--pretrained-weights``; frozen), the heads' default options, the same iterations,
learning rate, crops and seed; reported: the test mean foreground Dice of the best validation
checkpoint (``results.json``), each foreground class's Dice, and the run's wall minutes. The
defaults (ViT-S/8 at 4 mm, 32³ crops, 200 iterations) took 0.5-6 minutes per head (DinoUNet the
slowest) on 2 busy cores, 15 minutes for the whole command (docs/benchmarks.md).

Usage::

    python scripts/benchmark.py heads                                    # both parts, defaults
    python scripts/benchmark.py heads --no-finetune --arch vit_small_3d --window 64 --rounds 3
    python scripts/benchmark.py heads --heads UNETR,DPT --pretrained-weights teacher_checkpoint.pth
    python scripts/benchmark.py heads --finetune-iterations 500 --keep-runs heads_runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

BACKBONE_ROW = "backbone (4 taps)"
SAMPLE_DATALIST = "segmentation_tissue_seed-0.json"  # what write_segmentation_dataset(labels="tissue", seed=0) writes


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
    add_finetune_arguments(p)
    return p


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the short-finetune part (test Dice on the embedded brain-tissue sample)."""
    g = p.add_argument_group("short finetune (test Dice on the embedded brain-tissue sample)")
    g.add_argument("--no-finetune", dest="finetune", action="store_false", help="size and speed only")
    g.add_argument("--pretrained-weights", default="none",
                   help="teacher checkpoint for the finetune's backbone ('none': random --finetune-arch)")
    g.add_argument("--finetune-arch", default="vit_small_3d", help="backbone with --pretrained-weights none")
    g.add_argument("--finetune-patch-size", type=int, default=8, help="its patch, with --pretrained-weights none")
    g.add_argument("--finetune-window", type=int, default=32, help="training crop = sliding window side")
    g.add_argument("--finetune-resize-scale", type=float, default=0.5,
                   help="voxels per axis relative to the preset's 2 mm (0.5: 4 mm)")
    g.add_argument("--finetune-iterations", type=int, default=200)
    g.add_argument("--finetune-eval-every", type=int, default=50, help="validate (and keep the best) every N")
    g.add_argument("--finetune-lr", type=float, default=1e-3)
    g.add_argument("--finetune-warmup", type=int, default=20)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--finetune-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every head's run (repeatable)")
    g.add_argument("--data-dir", default=None, help="where the sample set is (written there if missing)")
    g.add_argument("--keep-runs", default=None, help="keep each head's run folder here (default: a temporary folder)")


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


def finetune_argv(head: str, args: argparse.Namespace, data_dir: Path, out_dir: Path) -> list[str]:
    """The ``python -m dinov2.eval.segmentation`` arguments of ``head``'s short finetune (the same for every head)."""
    it = args.finetune_iterations
    argv = ["--pretrained-weights", str(args.pretrained_weights), "--dataset-name", "brain_tissue",
            "--base-data-dir", str(data_dir), "--output-dir", str(out_dir), "--segmentation-head", head,
            "--epochs", "1", "--epoch-length", str(it), "--eval-period-iterations", str(args.finetune_eval_every),
            "--warmup-iters", str(args.finetune_warmup), "--learning-rate", str(args.finetune_lr),
            "--batch-size", "1", "--num-workers", "0", "--image-size", str(args.finetune_window),
            "--resize-scale", str(args.finetune_resize_scale), "--seed", str(args.seed), "--device", "cpu",
            "--precision", "fp32", f"train.log_period_iterations={max(it // 10, 1)}", "train.resume=false"]
    if str(args.pretrained_weights).strip().lower() in ("none", ""):
        argv += [f"model.arch={args.finetune_arch}", f"model.backbone_kwargs={{patch_size: {args.finetune_patch_size}}}"]
    return argv + list(args.finetune_override)


def finetune_head(head: str, args: argparse.Namespace, data_dir: Path, out_dir: Path) -> dict:
    """Run ``head``'s short finetune; its test scores from ``results.json``.

    Returns:
        ``{"dice": mean foreground test Dice, "class_dice": {class: Dice}, "minutes": wall minutes,
        "loss": (first, last logged training loss)}``.
    """
    from dinov2.eval.segmentation import finetune

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # its closing Dice line: stdout is kept for the table
        code = finetune.main(finetune_argv(head, args, data_dir, out_dir))
    if code != 0:
        raise SystemExit(f"The {head} finetune failed (its ERROR line is above); output in {out_dir}")
    results = json.loads((out_dir / "results.json").read_text())
    summary, curve = results["test"]["summary"], results["curves"]["train"]
    foreground = [results["channels"][k] for k in results["foreground_channels"]]
    return {"dice": summary["mean_dice"], "class_dice": {c: summary["dice"][c] for c in foreground},
            "minutes": (time.perf_counter() - start) / 60, "loss": (curve[0]["loss"], curve[-1]["loss"])}


@contextlib.contextmanager
def run_folder(keep: str | None) -> Iterator[Path]:
    """``--keep-runs`` (created), or a temporary folder removed afterwards."""
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        yield Path(keep)
        return
    with tempfile.TemporaryDirectory(prefix="benchmark_heads_") as tmp:
        yield Path(tmp)


def finetune_all(names: Sequence[str], args: argparse.Namespace) -> dict[str, dict]:
    """:func:`finetune_head` for every head, on the sample set (written to ``--data-dir`` or the run folder)."""
    from dinov2.sample_data import write_segmentation_dataset

    with run_folder(args.keep_runs) as root:
        data_dir = Path(args.data_dir) if args.data_dir else root / "brain_tissue"
        if not (data_dir / SAMPLE_DATALIST).is_file():
            write_segmentation_dataset(data_dir, labels="tissue", seed=0)
        return {name: finetune_head(name, args, data_dir, root / name) for name in names}


def timing_caption(args: argparse.Namespace, load: tuple[float, float]) -> str:
    """What the size and speed columns measured."""
    return (f"Size and speed: {args.arch} patch {args.patch_size} (random init, frozen), window {args.window}³, "
            f"batch 1, {args.in_channels} channel(s), {args.classes} classes, fp32, {args.threads} thread(s); median "
            f"of {args.rounds} alternating rounds; load average {load[0]:.2f} before, {load[1]:.2f} after.")


def finetune_caption(args: argparse.Namespace, load: tuple[float, float]) -> str:
    """The short finetune's settings, the same for every head."""
    backbone = (f"{args.finetune_arch} patch {args.finetune_patch_size}, random init"
                if str(args.pretrained_weights).strip().lower() in ("none", "") else f"teacher {args.pretrained_weights}")
    mm = 2.0 / args.finetune_resize_scale
    overrides = "".join(f"; {o}" for o in args.finetune_override)
    return (f"Test Dice: the same short finetune per head on the embedded brain-tissue sample (5 training, "
            f"1 validation, 2 test variants of one T1; 3 foreground classes): backbone {backbone}, frozen; head "
            f"defaults; {mm:g} mm, {args.finetune_window}³ crops (2 per step), {args.finetune_iterations} iterations, "
            f"lr {args.finetune_lr:g} (warm-up {args.finetune_warmup}, cosine), validation every "
            f"{args.finetune_eval_every}, best validation checkpoint tested; seed {args.seed}, fp32, "
            f"{args.threads} thread(s){overrides}; load average {load[0]:.2f} before, {load[1]:.2f} after.")


def format_row(row: dict, tuned: dict | None) -> str:
    """One Markdown row: timing columns, then (with ``tuned``) the finetune columns."""
    params = "–" if row["params"] is None else f"{row['params'] / 1e6:.2f}"
    cells = [row["head"], params, f"{row['cpu_s']:.2f}", f"{row['wall_s']:.2f}"]
    if tuned is not None:
        result = tuned.get(row["head"])
        cells += (["–"] * 3 if result is None else
                  [f"{result['dice']:.3f}", " / ".join(f"{d:.2f}" for d in result["class_dice"].values()),
                   f"{result['minutes']:.1f}"])
    return "| " + " | ".join(cells) + " |"


def format_table(rows: list[dict], args: argparse.Namespace, load: tuple[float, float],
                 tuned: dict[str, dict] | None = None, tune_load: tuple[float, float] | None = None) -> str:
    """Markdown table (and captions) for docs/benchmarks.md; finetune columns when ``tuned`` is given."""
    lines = [timing_caption(args, load)]
    header = "| head | trainable params (M) | s / window (CPU) | s / window (wall) |"
    rule = "|---|---:|---:|---:|"
    if tuned is not None:
        lines.append(finetune_caption(args, tune_load))
        classes = " / ".join(next(iter(tuned.values()))["class_dice"]) if tuned else "classes"
        header += f" test Dice (mean fg) | test Dice ({classes}) | finetune min |"
        rule += "---:|---:|---:|"
    lines += ["", header, rule] + [format_row(r, tuned) for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Build, time, finetune (unless ``--no-finetune``), print the table; return its rows (with
    ``dice``, ``class_dice``, ``minutes`` where finetuned)."""
    args = get_parser().parse_args(argv)
    if min(args.window, args.rounds, args.threads, args.in_channels, args.classes) < 1:
        raise SystemExit("--window, --rounds, --threads, --in-channels and --classes must be >= 1")
    torch.set_num_threads(args.threads)
    models = build_models(args)
    window = torch.randn(1, args.in_channels, args.window, args.window, args.window,
                         generator=torch.Generator().manual_seed(0))
    before = os.getloadavg()[0]
    rows = rows_of(models, alternate(forwards(models, window), args.rounds))
    load = (before, os.getloadavg()[0])
    del models, window  # the finetune runs need the memory more
    tuned, tune_load = None, None
    if args.finetune:
        before = os.getloadavg()[0]
        tuned = finetune_all([r["head"] for r in rows if r["params"] is not None], args)
        tune_load = (before, os.getloadavg()[0])
    print(format_table(rows, args, load, tuned, tune_load))
    return [{**r, **((tuned or {}).get(r["head"]) or {})} for r in rows]


if __name__ == "__main__":
    main()
