"""Pretraining throughput: ``python scripts/benchmark.py train`` (or this file directly).

Runs the real training loop (``dinov2.train.train3d.train``: data loader with augmentation
workers, student + teacher, DINO/iBOT/KoLeo, AdamW, EMA) for a few iterations per setting on
the real brain volumes that ship in installed packages, and reports:

* iterations/s and samples/s (median over the timed iterations, after warm-up);
* MFU: model FLOPs per iteration / iteration time / the GEMM peak measured in the same
  process with the same thread count (``dinov2.benchmarking.perf.matmul_peak_gflops``). FLOPs per
  iteration = 3 x student forward (backbone on all crops + both heads) + teacher forward
  (backbone on the global crops + both heads), matrix products only; the iBOT head rows use
  the expected number of masked tokens;
* the share of wall time spent waiting for the data loader.

The preprocessing cache is filled before timing, so the data share is augmentation + collate.

Settings (``--settings``, comma-separated): ``tiny`` (configs/tiny_cpu.yaml as is), ``vit_s``
and ``vit_b`` (vit_small_3d / vit_base_3d, patch 16, 64^3 global / 32^3 local crops, 4 local
crops, batch 2, the default 65,536-prototype heads): CPU-sized versions of the recipe.

Usage::

    python scripts/benchmark.py train                        # all three settings
    python scripts/benchmark.py train --settings tiny --iterations 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]

SETTINGS: dict[str, list[str]] = {
    "tiny": [],
    "vit_s": ["train.cpu_threads=null", "student.arch=vit_small_3d", "student.patch_size=16", "crops.global_crops_size=64",
              "crops.local_crops_size=32", "crops.local_crops_number=4", "train.batch_size_per_gpu=2",
              "dino.head_n_prototypes=65536", "dino.head_bottleneck_dim=256", "dino.head_hidden_dim=2048",
              "ibot.head_n_prototypes=65536", "ibot.head_bottleneck_dim=256", "ibot.head_hidden_dim=2048"],
}
SETTINGS["vit_b"] = [o.replace("vit_small_3d", "vit_base_3d") for o in SETTINGS["vit_s"]]


def _head_macs_per_row(head: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in head.modules() if isinstance(m, nn.Linear)) + \
        head.last_layer.in_features * head.last_layer.out_features


def iteration_flops(cfg) -> float:
    """Model FLOPs (2 x MACs of matrix products) of one training iteration of one process.

    Counted on an fp32 view of ``cfg``: the model is built on the meta device, where the bf16
    hardware check of ``SSLMetaArch`` has nothing to check, and FLOPs do not depend on the dtype.
    """
    from omegaconf import OmegaConf

    from dinov2.benchmarking.perf import model_forward_flops
    from dinov2.train.ssl_meta_arch import N_GLOBAL_CROPS, SSLMetaArch

    cfg = OmegaConf.merge(cfg, {"compute_precision": {"dtype": "fp32"}})
    with torch.device("meta"):
        arch = SSLMetaArch(cfg, "meta")
    b, c = int(cfg.train.batch_size_per_gpu), int(cfg.student.in_chans)
    g, l, n_local = int(cfg.crops.global_crops_size), int(cfg.crops.local_crops_size), int(cfg.crops.local_crops_number)
    backbone = arch.student.backbone
    global_fwd = model_forward_flops(backbone, (N_GLOBAL_CROPS * b, c, g, g, g))
    local_fwd = model_forward_flops(backbone, (n_local * b, c, l, l, l)) if n_local else 0
    tokens = (g // int(cfg.student.patch_size)) ** 3
    low, high = (float(v) for v in cfg.ibot.mask_ratio_min_max)
    masked_rows = N_GLOBAL_CROPS * b * float(cfg.ibot.mask_sample_probability) * (low + high) / 2 * tokens
    dino_rows_student = (N_GLOBAL_CROPS + n_local) * b
    dino_macs, ibot_macs = _head_macs_per_row(arch.student.dino_head), _head_macs_per_row(arch.student.ibot_head)
    student = global_fwd + local_fwd + 2 * (dino_rows_student * dino_macs + masked_rows * ibot_macs)
    teacher = global_fwd + 2 * (N_GLOBAL_CROPS * b * dino_macs + masked_rows * ibot_macs)
    return 3 * student + teacher


def fill_cache(cfg) -> None:
    """Preprocess every volume of ``cfg.train.datalist`` into the preprocessing cache (``preprocessing.cache``).

    Reads each record of the pretraining dataset once, as training would, so that a timed run
    afterwards measures augmentation and collate, not the first read and preprocessing of a volume.
    """
    from dinov2.data.datasets import build_pretrain_dataset

    dataset = build_pretrain_dataset(cfg, cfg.train.datalist, seed=0, rank=0, world_size=1)
    for index in range(len(dataset)):
        dataset.record(index)


def started_workers(configured: int) -> int:
    """The loader workers a run with ``train.num_workers=configured`` really starts (train3d caps them at the CPUs)."""
    from dinov2.utils.cpus import cap_workers

    return cap_workers(configured, "train.num_workers")


def run_setting(name: str, datalist: Path, cache_dir: Path, work_dir: Path, iterations: int, warmup: int,
                threads: int | None, num_workers: int | None, extra: Sequence[str]) -> dict:
    """Train ``warmup + iterations`` iterations of one setting and summarise the timed ones."""
    from dinov2.benchmarking.perf import matmul_peak_gflops
    from dinov2.train.train3d import build_config, train

    overrides = [f"train.datalist={datalist}", f"train.max_iterations={warmup + iterations}",
                 "train.log_period_iterations=1", "train.monitor_collapse=false", "train.progress_bar=false",
                 "checkpointing.period_iterations=1000000", "evaluation.eval_period_iterations=1000000",
                 *SETTINGS[name], *extra]
    if threads is not None:
        overrides.append(f"train.cpu_threads={threads}")
    if num_workers is not None:
        overrides.append(f"train.num_workers={num_workers}")
    cfg = build_config(str(REPO / "configs" / "tiny_cpu.yaml"), overrides, cache_dir=str(cache_dir))
    fill_cache(cfg)
    out = work_dir / name
    train(cfg, out, resume=False)
    lines = [json.loads(x) for x in (out / "training_metrics.json").read_text().splitlines()][warmup:]
    previous = torch.get_num_threads()
    if cfg.train.cpu_threads is not None:
        torch.set_num_threads(int(cfg.train.cpu_threads))
    peak = matmul_peak_gflops(torch.float32)
    used_threads = torch.get_num_threads()
    torch.set_num_threads(previous)
    it_per_s = statistics.median(line["iterations_per_s"] for line in lines)
    flops = iteration_flops(cfg)
    return {
        "setting": name, "arch": str(cfg.student.arch), "batch": int(cfg.train.batch_size_per_gpu),
        "crops": f"2x{cfg.crops.global_crops_size}³ + {cfg.crops.local_crops_number}x{cfg.crops.local_crops_size}³",
        "prototypes": int(cfg.dino.head_n_prototypes), "threads": used_threads,
        # what the loader really started: train3d caps the configured count at the CPUs available
        "workers": started_workers(int(cfg.train.num_workers)),
        "iterations_per_s": it_per_s, "samples_per_s": it_per_s * int(cfg.train.batch_size_per_gpu),
        "gflop_per_iteration": flops / 1e9, "achieved_gflops": flops * it_per_s / 1e9, "peak_gflops": peak,
        "mfu": flops * it_per_s / 1e9 / peak,
        "data_wait_share": statistics.fmean(line["data_wait_share"] for line in lines),
        "timed_iterations": len(lines),
    }


def format_table(rows: list[dict]) -> str:
    header = ("| setting | arch | batch | crops | threads / workers | it/s | samples/s | GFLOP/it | "
              "MFU (vs measured fp32 GEMM peak) | data wait |\n|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['setting']} | {r['arch']} | {r['batch']} | {r['crops']} | {r['threads']} / {r['workers']} | "
        f"{r['iterations_per_s']:.2f} | {r['samples_per_s']:.2f} | {r['gflop_per_iteration']:.1f} | "
        f"{100 * r['mfu']:.1f}% of {r['peak_gflops']:.0f} GFLOP/s | {100 * r['data_wait_share']:.1f}% |\n"
        for r in rows)
    return header + body


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmark.py train", description="Pretraining-loop throughput on CPU.")
    p.add_argument("--settings", default="tiny,vit_s,vit_b", help=f"comma-separated, from {', '.join(SETTINGS)}")
    p.add_argument("--iterations", type=int, default=20, help="timed iterations per setting")
    p.add_argument("--warmup", type=int, default=3, help="untimed first iterations (worker start-up, allocation)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: tiny uses 1, vit_s / vit_b torch's default, all cores)")
    p.add_argument("--num-workers", type=int, default=None, help="data-loader workers (default: the config's)")
    p.add_argument("--cache-dir", default=None, help="preprocessing cache (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("overrides", nargs="*", default=[], help="extra key=value config overrides for every setting")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the benchmark; returns the rows (also printed as a Markdown table)."""
    args = get_parser().parse_args(argv)
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or not names:
        raise SystemExit(f"Unknown settings {unknown}; choose from {', '.join(SETTINGS)}.")
    if args.iterations < 1 or args.warmup < 1:
        raise SystemExit("--iterations and --warmup must be >= 1 (the first iteration pays for worker start-up).")
    from dinov2.benchmarking.perf import machine_description
    from dinov2.sample_data import write_pretraining_datalist
    from dinov2.utils.allocator import tune_cpu_allocator

    tune_cpu_allocator()  # as train3d's entry point does (DINOV2_MALLOC_TUNING=0 to compare without)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        datalist = write_pretraining_datalist(tmp / "pretrain.json")
        cache = Path(args.cache_dir) if args.cache_dir else tmp / "cache"
        for name in names:
            print(f"benchmark.py train: {name} ...", file=sys.stderr, flush=True)
            rows.append(run_setting(name, datalist, cache, tmp, args.iterations, args.warmup, args.threads,
                                    args.num_workers, args.overrides))
    print(" ".join(f"{k}: {v}" for k, v in machine_description().items()))
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
