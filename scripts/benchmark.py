"""Benchmarks of the toolkit: ``python scripts/benchmark.py {model,data,device-augment,train,segmentation,drop-path,preflight,onnx,serve,heads} [options]``.

``model``: one training step (forward + backward, no optimizer) of a 3D ViT backbone on random
volumes, single process, per precision mode. Reports seconds per step (median after warm-up),
effective GFLOP/s from the analytic FLOP count (cross-checked against PyTorch's FLOP counter),
MFU against GEMM peaks measured in the same run, and the accuracy of each reduced-precision
mode against fp32 (relative error and cosine similarity of outputs and of gradients).
Prints Markdown tables (paste them into ``docs/benchmarks.md``).

Every other command runs ``scripts/benchmark_<command>.py`` (``drop-path``: ``benchmark_drop_path.py``,
``device-augment``: ``benchmark_device_augment.py``) with its own options (``-h`` after the command
lists them): ``data``, ``device-augment`` (crops made batched by the training process, the
``crops.augment_on_device`` path, against today's per-sample pipeline), ``train``, ``segmentation``,
``drop-path``, ``preflight`` (the input pre-flight's cost), ``onnx`` (ONNX Runtime vs eager),
``serve`` (the HTTP service's load) and ``heads`` (every segmentation head).

Usage::

    python scripts/benchmark.py model                                  # ViT-B, batch 4, 96³
    python scripts/benchmark.py model --dtypes fp32,bf16,bf16-pure --steps 5
    python scripts/benchmark.py model --arch vit_small_3d --compile    # adds torch.compile rows
    python scripts/benchmark.py data --seconds 20

Precision modes (``--dtypes``):
    fp32       parameters, activations and matmuls in float32.
    bf16       ``torch.autocast(bfloat16)`` via ``dinov2.utils.precision.autocast_context``:
               matmuls/SDPA in bf16, parameters and gradients fp32 (what training uses).
    bf16-pure  the model cast to bfloat16 (weights, activations, gradients): the ceiling of a
               "bf16 weights + fp32 master copy in the optimizer" scheme, without its update cost.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from dinov2.models import MODEL_REGISTRY, build_model
from dinov2.benchmarking.perf import (
    TRAIN_STEP_FLOP_FACTOR,
    counted_forward_flops,
    machine_description,
    matmul_peak_gflops,
    model_forward_flops,
    time_callable,
)
from dinov2.utils.precision import autocast_context, native_bf16_support

MODES = ("fp32", "bf16", "bf16-pure")
_PEAK_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-pure": torch.bfloat16}


# ------------------------------------------------------------------------------ model
def _parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"--dtypes takes a comma list of {', '.join(MODES)}; got '{text}'")
    return modes


def _model_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmark.py model", description="Backbone training-step benchmark.")
    p.add_argument("--arch", default="vit_base_3d", choices=sorted(MODEL_REGISTRY))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--depth", type=int, default=None,
                   help="override the architecture's number of blocks (e.g. time 2 blocks of a slow mode: "
                        "every block costs the same, FLOPs follow the depth)")
    p.add_argument("--img-size", type=int, default=96, help="cubic input side (multiple of the patch size)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode (median reported)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps per mode first (>= 1; the first one is reported as 'first step s')")
    p.add_argument("--dtypes", type=_parse_modes, default=["fp32", "bf16"],
                   help=f"comma list of precision modes: {', '.join(MODES)}")
    p.add_argument("--compile", action="store_true",
                   help="also time each mode under torch.compile (inductor; compile time reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's, one per physical core)")
    p.add_argument("--peak-size", type=int, default=2048, help="side of the square GEMMs for the peak")
    p.add_argument("--init-values", type=float, default=1.0,
                   help="LayerScale init; 1.0 (not the 1e-5 training default) so every block contributes "
                        "to the outputs and the bf16 accuracy check covers the whole network; speed is unaffected")
    p.add_argument("--seed", type=int, default=0)
    return p


class _StepRunner:
    """One forward + backward of ``model`` in ``mode``; keeps the last outputs for accuracy."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, mode: str, compiled: bool):
        self.mode = mode
        if mode == "bf16-pure":
            model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
        self.model, self.x = model, x
        self.forward = torch.compile(model.forward_features) if compiled else model.forward_features
        self.last_output: dict[str, torch.Tensor] = {}
        gen = torch.Generator().manual_seed(1234)  # the same targets in every mode
        grid_tokens = math.prod(model.patch_embed.grid_size(x.shape[2:]))
        self.targets = (torch.randn(x.shape[0], model.embed_dim, generator=gen),
                        torch.randn(x.shape[0], grid_tokens, model.embed_dim, generator=gen))

    def __call__(self) -> None:
        for p in self.model.parameters():
            p.grad = None
        with autocast_context("bf16" if self.mode == "bf16" else "fp32", "cpu"):
            out = self.forward(self.x)
        cls, patches = out["x_norm_clstoken"].float(), out["x_norm_patchtokens"].float()
        # Regression to fixed random targets: the gradient reaches every output. (A loss of
        # the squared outputs alone would be ~constant after the final LayerNorm, leaving
        # gradients of pure rounding noise and a meaningless accuracy comparison.)
        ((cls - self.targets[0]).square().mean() + (patches - self.targets[1]).square().mean()).backward()
        self.last_output = {"cls": cls.detach(), "patches": patches.detach()}

    def gradients(self) -> dict[str, torch.Tensor]:
        return {n: p.grad.detach().float() for n, p in self.model.named_parameters() if p.grad is not None}


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-300))


def _cosine(a: torch.Tensor, ref: torch.Tensor) -> float:
    # float64: an fp32 dot product over ~10⁸ gradient entries drifts by more than bf16's error.
    a, ref = a.double().flatten(), ref.double().flatten()
    return float(a @ ref / (a.norm() * ref.norm()).clamp_min(1e-300))


def accuracy_vs_reference(out: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                          ref_out: dict[str, torch.Tensor], ref_grads: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative L2 error and cosine similarity of outputs and gradients against fp32.

    Args:
        out, ref_out: ``{"cls": (B, E), "patches": (B, N, E)}``.
        grads, ref_grads: parameter name → gradient (fp32 copies).

    Returns:
        ``out_rel_err``, ``out_cos`` (patch tokens), ``grad_rel_err``, ``grad_cos`` (all gradients
        as one vector) and ``grad_median_cos`` (median over parameter tensors; not the minimum,
        which is always noise: e.g. the key bias gets an exactly-zero gradient in exact
        arithmetic because softmax ignores a constant added to every logit).
    """
    names = sorted(ref_grads)
    flat = torch.cat([grads[n].flatten() for n in names])
    ref_flat = torch.cat([ref_grads[n].flatten() for n in names])
    per_param = [_cosine(grads[n], ref_grads[n]) for n in names if ref_grads[n].norm() > 0]
    return {
        "out_rel_err": _rel_err(out["patches"], ref_out["patches"]),
        "out_cos": _cosine(out["patches"], ref_out["patches"]),
        "cls_rel_err": _rel_err(out["cls"], ref_out["cls"]),
        "grad_rel_err": _rel_err(flat, ref_flat),
        "grad_cos": _cosine(flat, ref_flat),
        "grad_median_cos": statistics.median(per_param),
    }


def run_model_benchmark(args: argparse.Namespace) -> list[dict]:
    """Time every requested mode; return one result dict per row of the table."""
    torch.manual_seed(args.seed)
    overrides = {} if args.depth is None else {"depth": args.depth}
    model = build_model(args.arch, img_size=args.img_size, init_values=args.init_values, **overrides).train()
    x = torch.randn(args.batch_size, model.in_chans, args.img_size, args.img_size, args.img_size)
    fwd_flops = model_forward_flops(model, x.shape)
    counted = counted_forward_flops(model, x[:1]) * args.batch_size  # one sample is enough, and cheap
    if abs(counted - fwd_flops) > 1e-6 * fwd_flops:
        raise RuntimeError(f"Analytic forward FLOPs {fwd_flops} != FlopCounterMode {counted}: fix "
                           "dinov2/benchmarking/perf.py:model_forward_flops for this architecture")
    step_flops = TRAIN_STEP_FLOP_FACTOR * fwd_flops
    print(f"# {args.arch}{'' if args.depth is None else f' (depth {args.depth})'}, batch {args.batch_size}, {args.img_size}³ input, "
          f"{model.patch_embed.grid_size((args.img_size,) * 3)} patch grid")
    print(f"forward {fwd_flops / 1e9:.2f} GFLOP (FlopCounterMode agrees: {counted / 1e9:.2f}); "
          f"train step = {TRAIN_STEP_FLOP_FACTOR}× forward = {step_flops / 1e9:.2f} GFLOP\n", flush=True)

    if any(m.startswith("bf16") for m in args.dtypes) and not native_bf16_support("cpu"):
        print("note: this CPU has no native bf16 (no AVX512-BF16/AMX): bf16 steps run 10-25x slower than "
              "fp32 (ViT-B: minutes per step). Use --steps 1 or --depth 2 to keep the run short.\n", flush=True)
    peak_dtypes = sorted({_PEAK_DTYPE[m] for m in args.dtypes} | {torch.float32}, key=str)
    peaks = _measure_peaks(peak_dtypes, args.peak_size, {})

    rows, ref = [], None
    variants = [(m, False) for m in args.dtypes] + ([(m, True) for m in args.dtypes] if args.compile else [])
    if "fp32" not in args.dtypes:  # accuracy needs the fp32 reference, computed untimed
        ref_runner = _StepRunner(copy.deepcopy(model), x, "fp32", compiled=False)
        ref_runner()
        ref = (ref_runner.last_output, ref_runner.gradients())
        del ref_runner
    for mode, compiled in variants:
        runner = _StepRunner(copy.deepcopy(model), x, mode, compiled)
        start = time.perf_counter()
        runner()  # first call: allocation, primitive creation, compilation under --compile
        first = time.perf_counter() - start
        timing = time_callable(runner, repeats=args.steps, warmup=args.warmup - 1)
        gflops = step_flops / timing.median / 1e9
        row = {"mode": mode + (" + compile" if compiled else ""), "s_per_step": timing.median,
               "min_s": timing.min, "spread": timing.spread, "cores_used": timing.cores_used, "gflops": gflops,
               "gflops_per_cpu_s": step_flops / statistics.median(timing.cpu_times) / 1e9,
               "first_step_s": first}
        if mode == "fp32" and not compiled and ref is None:
            ref = (runner.last_output, runner.gradients())
        else:
            row.update(accuracy_vs_reference(runner.last_output, runner.gradients(), *ref))
        rows.append(row)
        print(f"{row['mode']}: {timing.median:.3f} s/step, {gflops:.1f} GFLOP/s", flush=True)
        del runner
    # A peak is a maximum: measure it again after the steps and keep the better one, so a burst
    # of other work during the first measurement does not inflate every MFU.
    final = _measure_peaks(peak_dtypes, args.peak_size, peaks)
    for row in rows:
        row["mfu"] = row["gflops"] / final[_PEAK_DTYPE[row["mode"].split(" ")[0]]]
    return rows


def _measure_peaks(dtypes: list[torch.dtype], size: int, previous: dict) -> dict:
    """GEMM peak per dtype (GFLOP/s), the max with ``previous``; prints each measurement."""
    peaks = {}
    for dtype in dtypes:
        start = time.perf_counter()
        value = matmul_peak_gflops(dtype, size=size, repeats=3)
        peaks[dtype] = max(value, previous.get(dtype, 0.0))
        print(f"GEMM peak {str(dtype).replace('torch.', '')} {size}²: {value:.1f} GFLOP/s "
              f"({time.perf_counter() - start:.0f} s){' (after the steps)' if previous else ''}", flush=True)
    return peaks


def format_model_tables(rows: list[dict], peaks_note: str) -> str:
    """The speed and accuracy tables as Markdown."""
    lines = [
        "| mode | s/step (median) | min | spread | cores used | GFLOP/s | MFU | GFLOP per CPU-s | first step s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['s_per_step']:.3f} | {r['min_s']:.3f} | {r['spread']:.0%} | "
                     f"{r['cores_used']:.2f} | {r['gflops']:.1f} | {r['mfu']:.0%} | "
                     f"{r['gflops_per_cpu_s']:.1f} | {r['first_step_s']:.1f} |")
    acc = [r for r in rows if "out_rel_err" in r]
    if acc:
        lines += ["", "| mode vs fp32 | patch-token rel. err | cos | CLS rel. err | grad rel. err | "
                      "grad cos | median tensor cos |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in acc:
            lines.append(f"| {r['mode']} | {r['out_rel_err']:.2e} | {r['out_cos']:.6f} | {r['cls_rel_err']:.2e} | "
                         f"{r['grad_rel_err']:.2e} | {r['grad_cos']:.6f} | {r['grad_median_cos']:.6f} |")
    lines += ["", peaks_note]
    return "\n".join(lines)


def main_model(argv: Sequence[str]) -> list[dict]:
    """Entry point of ``benchmark.py model``."""
    args = _model_parser().parse_args(argv)
    for name in ("batch_size", "img_size", "steps", "warmup", "peak_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.depth is not None and args.depth < 1:
        raise SystemExit("--depth must be >= 1")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    machine = machine_description()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()), flush=True)
    rows = run_model_benchmark(args)
    load_after = machine_description()["load_average_1m"]
    note = (f"Effective GFLOP/s = {TRAIN_STEP_FLOP_FACTOR} × analytic forward FLOPs / median step time; "
            f"MFU against the better of the two GEMM peaks of the mode's dtype measured above (before and after the steps). 'cores used' = CPU s / wall s "
            f"per step (below the thread count: other processes competed); 'GFLOP per CPU-s' divides by CPU "
            f"time instead of wall time (per-core throughput; robust to competition with 1 thread). Load average "
            f"{machine['load_average_1m']} before, {load_after} after (other processes on the machine "
            f"slow every figure).")
    print("\n" + format_model_tables(rows, note))
    return rows


# --------------------------------------------------------------------------- dispatch
def _run_sibling_script(filename: str, argv: Sequence[str], missing: str):
    """Run ``main(argv)`` of a sibling script, loaded by path (``scripts/`` is not a package)."""
    path = Path(__file__).with_name(filename)
    if not path.is_file():
        print(f"{missing}: {path} is missing. It is written separately; update the checkout.", file=sys.stderr)
        raise SystemExit(2)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "main"):
        raise SystemExit(f"{path} defines no main(argv); it must, to be run through benchmark.py")
    return module.main(list(argv))


def main_data(argv: Sequence[str]):
    """``benchmark.py data``: ``scripts/benchmark_data.py`` (its own options)."""
    return _run_sibling_script("benchmark_data.py", argv, "The data benchmark is not available")


def main_device_augment(argv: Sequence[str]):
    """``benchmark.py device-augment``: ``scripts/benchmark_device_augment.py`` (``crops.augment_on_device`` on CPU)."""
    return _run_sibling_script("benchmark_device_augment.py", argv, "The device-augmentation benchmark is not available")


def main_train(argv: Sequence[str]):
    """``benchmark.py train``: ``scripts/benchmark_train.py`` (its own options)."""
    return _run_sibling_script("benchmark_train.py", argv, "benchmark.py train: not implemented yet")


def main_drop_path(argv: Sequence[str]):
    """``benchmark.py drop-path``: ``scripts/benchmark_drop_path.py`` (kept-subset vs mask stochastic depth)."""
    return _run_sibling_script("benchmark_drop_path.py", argv, "The drop-path benchmark is not available")


def main_heads(argv: Sequence[str]):
    """``benchmark.py heads``: ``scripts/benchmark_heads.py`` (parameters and window forward time of every segmentation head)."""
    return _run_sibling_script("benchmark_heads.py", argv, "The heads benchmark is not available")


def main_onnx(argv: Sequence[str]):
    """``benchmark.py onnx``: ``scripts/benchmark_onnx.py`` (sliding windows, PyTorch eager vs ONNX Runtime)."""
    return _run_sibling_script("benchmark_onnx.py", argv, "The ONNX benchmark is not available")


def main_segmentation(argv: Sequence[str]):
    """``benchmark.py segmentation``: ``scripts/benchmark_segmentation.py`` (its own options)."""
    return _run_sibling_script("benchmark_segmentation.py", argv, "The segmentation benchmark is not available")


def main_serve(argv: Sequence[str]):
    """``benchmark.py serve``: ``scripts/benchmark_serve.py`` (requests/s and latency of the HTTP service)."""
    return _run_sibling_script("benchmark_serve.py", argv, "The service benchmark is not available")


def main_preflight(argv: Sequence[str]):
    """``benchmark.py preflight``: ``scripts/benchmark_preflight.py`` (what the input pre-flight costs)."""
    return _run_sibling_script("benchmark_preflight.py", argv, "The pre-flight benchmark is not available")


COMMANDS: dict[str, Callable[[Sequence[str]], object]] = {
    "model": main_model, "data": main_data, "device-augment": main_device_augment, "train": main_train,
    "segmentation": main_segmentation, "drop-path": main_drop_path, "heads": main_heads, "preflight": main_preflight,
    "serve": main_serve, "onnx": main_onnx,
}


def main(argv: Sequence[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python scripts/benchmark.py {{{','.join(COMMANDS)}}} [options]  (-h after the command "
              "for its options)", file=sys.stderr)
        raise SystemExit(2)
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
