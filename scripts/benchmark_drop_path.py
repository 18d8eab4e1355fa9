"""Stochastic depth on a kept subset vs the mask it replaced: ``python scripts/benchmark.py drop-path``.

Two measurements, each alternating the two implementations round by round in one process
(``Block.subset_drop_path`` True / False), timed in CPU seconds (``time.process_time``) so
that other load on a shared machine counts less, with the load average printed beside them:

* **backbone**: the student backbone's forward + backward on crop groups (``2B`` global crops
  of ``G^3`` and ``n_local * B`` local crops of ``L^3``, one crop-group forward), stochastic
  depth at ``--rate`` in every block (the published recipe: 0.3, uniform);
* **iteration**: a whole pretraining step without the optimizer
  (``SSLMetaArch.forward_backward``: teacher forward, student forward on all crops, DINO +
  iBOT + KoLeo, backward) on the same crops and model, default heads.

The subset implementation runs each residual branch on ``round(n * (1 - rate))`` of a group's
``n`` samples, so the ideal backbone gain at rate 0.3 is ``1 / 0.7 = 1.43x`` (attention and MLP
only; patch embedding, norms outside branches and the heads do not shrink).

Usage::

    python scripts/benchmark.py drop-path                      # ViT-S/16, batch 8, 64^3 + 8 x 32^3
    python scripts/benchmark.py drop-path --arch vit_base_3d --rounds 6 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Sequence

import torch

MODES = {"subset": True, "mask": False}


def _set_mode(model: torch.nn.Module, subset: bool) -> None:
    for module in model.modules():
        if hasattr(module, "subset_drop_path"):
            module.subset_drop_path = subset


def _crops(args: argparse.Namespace, generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``2B`` global crops ``(1, G, G, G)`` and ``n_local * B`` local crops ``(1, L, L, L)`` per sample."""
    g, local = args.global_size, args.local_size
    return ([torch.randn(1, g, g, g, generator=generator) for _ in range(2 * args.batch_size)],
            [torch.randn(1, local, local, local, generator=generator) for _ in range(args.local_crops * args.batch_size)])


def _alternate(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """CPU seconds of each step per round; the order flips every round so drift hits both alike."""
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up: allocator, oneDNN primitives
        step()
    for r in range(rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            start = time.process_time()
            steps[name]()
            seconds[name].append(time.process_time() - start)
    return seconds


def backbone_steps(args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """One fwd+bwd of the student backbone on the crop groups, per implementation."""
    from dinov2.models import build_model

    model = build_model(args.arch, patch_size=args.patch_size, img_size=args.global_size,
                        drop_path_rate=args.rate, drop_path_uniform=True).train()
    globals_, locals_ = _crops(args, torch.Generator().manual_seed(0))
    groups = [torch.stack(globals_), torch.stack(locals_)]

    def step(subset: bool) -> None:
        _set_mode(model, subset)
        model.zero_grad(set_to_none=True)
        outs = model.forward_features(groups)
        sum(o["x_norm_clstoken"].sum() + o["x_norm_patchtokens"].mean() for o in outs).backward()

    return {name: (lambda s=subset: step(s)) for name, subset in MODES.items()}


def iteration_steps(args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """One ``SSLMetaArch.forward_backward`` on the same crops, per implementation."""
    import numpy as np

    from dinov2.data.collate import collate_data_and_cast
    from dinov2.train.ssl_meta_arch import SSLMetaArch
    from dinov2.utils.config import merge_configs, packaged_config_path

    cfg = merge_configs(packaged_config_path("ssl3d_default_config"), None, [
        "train.datalist=unused.json", f"student.arch={args.arch}", f"student.patch_size={args.patch_size}",
        f"student.drop_path_rate={args.rate}", "student.drop_path_uniform=true",
        f"crops.global_crops_size={args.global_size}", f"crops.local_crops_size={args.local_size}",
        f"crops.local_crops_number={args.local_crops}", "compute_precision.dtype=fp32", "device=cpu"])
    model = SSLMetaArch(cfg).train()
    globals_, locals_ = _crops(args, torch.Generator().manual_seed(0))
    samples = [{"global_crops": globals_[2 * i:2 * i + 2],
                "local_crops": locals_[i * args.local_crops:(i + 1) * args.local_crops]} for i in range(args.batch_size)]
    side = args.global_size // args.patch_size
    batch = collate_data_and_cast(samples, tuple(cfg.ibot.mask_ratio_min_max), cfg.ibot.mask_sample_probability,
                                  (side,) * 3, rng=np.random.default_rng(0))

    def step(subset: bool) -> None:
        _set_mode(model, subset)
        model.zero_grad(set_to_none=True)
        model.forward_backward(batch, teacher_temp=0.07)

    return {name: (lambda s=subset: step(s)) for name, subset in MODES.items()}


def summarise(name: str, seconds: dict[str, list[float]]) -> dict:
    """Median CPU seconds per implementation and the ratio mask / subset (> 1: the subset is faster)."""
    median = {mode: statistics.median(values) for mode, values in seconds.items()}
    return {"measure": name, "subset_s": median["subset"], "mask_s": median["mask"],
            "speedup": median["mask"] / median["subset"], "rounds": len(seconds["subset"])}


def format_table(rows: list[dict], args: argparse.Namespace, load: tuple[float, float]) -> str:
    """Markdown table for docs/benchmarks.md."""
    lines = [f"Stochastic depth {args.rate} (uniform), {args.arch} patch {args.patch_size}, batch {args.batch_size}: "
             f"2x{args.global_size}^3 + {args.local_crops}x{args.local_size}^3 crops per sample, {args.threads} thread(s), "
             f"fp32; CPU seconds, median of {args.rounds} alternating rounds; load average {load[0]:.2f} before, "
             f"{load[1]:.2f} after.", "",
             "| measure | kept subset (s) | mask (s) | subset speed-up |", "|---|---|---|---|"]
    lines += [f"| {r['measure']} | {r['subset_s']:.3f} | {r['mask_s']:.3f} | {r['speedup']:.2f}x |" for r in rows]
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python scripts/benchmark.py drop-path", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vit_small_3d")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--global-size", type=int, default=64)
    p.add_argument("--local-size", type=int, default=32)
    p.add_argument("--local-crops", type=int, default=8)
    p.add_argument("--rate", type=float, default=0.3, help="stochastic-depth rate of every block")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per implementation (median reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--measures", default="backbone,iteration", help="comma-separated: backbone, iteration")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the measurements, print the table, return its rows."""
    args = get_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    builders = {"backbone": backbone_steps, "iteration": iteration_steps}
    before = os.getloadavg()[0]
    rows = []
    for name in [m.strip() for m in args.measures.split(",") if m.strip()]:
        if name not in builders:
            raise SystemExit(f"--measures: unknown measure '{name}' (choose from {', '.join(builders)})")
        rows.append(summarise(name, _alternate(builders[name](args), args.rounds)))
    print(format_table(rows, args, (before, os.getloadavg()[0])))
    return rows


if __name__ == "__main__":
    main()
