"""Load on the HTTP service: ``python scripts/benchmark.py serve``.

Starts ``python -m dinov2.serve`` in a child process with a small random UNETR (the numbers
measure the service and the sliding-window pipeline, not a trained model), then sends
``--requests`` requests per endpoint from ``--clients`` concurrent clients (threads using
:class:`dinov2.serve.Client`) with a real T1 MRI (the MNI152 2 mm template cropped to ``--size``³).
Prints requests/s, median and 95th-percentile latency, and the 1-minute load average before and
after each endpoint (other processes on the machine slow every figure) as a Markdown table.

Usage::

    python scripts/benchmark.py serve                                   # 32 requests, 4 clients, 1 at a time
    python scripts/benchmark.py serve --concurrency 2 --clients 8 --requests 64 --server-threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch


def write_checkpoint(path: Path, args: argparse.Namespace) -> Path:
    """A finetuned checkpoint of a random UNETR on ``args``' backbone, brain_tissue preset (4 classes)."""
    from dinov2.checkpoints.finetuned import save_finetuned
    from dinov2.eval.presets import DatasetPreset, load_preset
    from dinov2.eval.segmentation.model import build_segmentation_model
    from dinov2.models import build_model

    raw = dict(load_preset("brain_tissue"))
    raw.update({"image_size": [args.window] * 3, "datalist": "dataset.json"})
    preset = DatasetPreset.from_config(raw)
    torch.manual_seed(0)
    kwargs = {"embed_dim": args.embed_dim, "depth": args.depth, "num_heads": max(1, args.embed_dim // 32),
              "patch_size": args.patch_size, "img_size": args.window}
    model = build_segmentation_model(build_model("vit_tiny_3d", **kwargs), "UNETR", 1, preset.out_channels,
                                     {"feature_size": 8})
    config = {"model": {"unetr": {"feature_size": 8}, "modality_merge": "concat"}}
    return save_finetuned(path, model, {"arch": "vit_tiny_3d", "kwargs": kwargs}, config, preset, 0,
                          {"name": "none", "value": 0.0})


def write_volume(path: Path, side: int) -> Path:
    """The MNI152 2 mm T1 (or the first real 3D volume found) cropped to ``side``³ around its centre."""
    from dinov2.sample_data import find_pretraining_volumes

    volumes = find_pretraining_volumes()
    source = next((p for p in volumes if p.name == "MNI152_T1_2mm.nii.gz"), volumes[0])
    image = nib.load(source)
    start = [max(0, (s - side) // 2) for s in image.shape[:3]]
    cropped = image.slicer[tuple(slice(a, a + side) for a in start)]
    nib.save(nib.Nifti1Image(np.asarray(cropped.dataobj, dtype=np.float32), cropped.affine), path)
    return path


def load_run(url: str, endpoint: str, volume: Path, requests: int, clients: int) -> dict:
    """Send ``requests`` requests from ``clients`` threads; wall time, latencies, errors, load average."""
    from dinov2.serve import Client

    client = Client(url, timeout=3600)
    call = client.segment if endpoint == "segment" else client.embed
    call(volume)  # warm-up: first-call allocations, oneDNN primitives

    def timed(_: int) -> float | None:
        start = time.perf_counter()
        try:
            call(volume)
        except Exception:  # noqa: BLE001 - counted as an error
            return None
        return time.perf_counter() - start

    load_before, start = os.getloadavg()[0], time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(timed, range(requests)))
    wall = time.perf_counter() - start
    latencies = sorted(r for r in results if r is not None)
    return {"endpoint": endpoint, "requests": requests, "clients": clients, "errors": requests - len(latencies),
            "rps": len(latencies) / wall, "p50": statistics.median(latencies) if latencies else float("nan"),
            "p95": _percentile(latencies, 0.95), "load": (load_before, os.getloadavg()[0])}


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted ``values``."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, int(np.ceil(q * len(values))) - 1))]


def format_table(rows: list[dict], args: argparse.Namespace) -> str:
    """Markdown table."""
    lines = [f"Service load: {args.size}³ real T1 at 2 mm, random UNETR on a ViT (embed {args.embed_dim}, depth "
             f"{args.depth}, patch {args.patch_size}, {args.window}³ windows), server --concurrency "
             f"{args.concurrency}, {args.server_threads or 'default'} torch thread(s), {os.cpu_count()} logical CPUs.",
             "", "| endpoint | requests | clients | req/s | p50 s | p95 s | errors | load avg 1m before → after |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['endpoint']} | {r['requests']} | {r['clients']} | {r['rps']:.2f} | {r['p50']:.3f} | "
              f"{r['p95']:.3f} | {r['errors']} | {r['load'][0]:.2f} → {r['load'][1]:.2f} |" for r in rows]
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    """The benchmark's flags (``python scripts/benchmark.py serve -h``)."""
    p = argparse.ArgumentParser(prog="python scripts/benchmark.py serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32, help="requests per endpoint")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients")
    p.add_argument("--concurrency", type=int, default=1, help="server --concurrency")
    p.add_argument("--server-threads", type=int, default=None, help="server --threads (default: PyTorch's)")
    p.add_argument("--endpoints", default="segment,embed", help="comma-separated: segment, embed")
    p.add_argument("--size", type=int, default=48, help="side of the cropped volume (voxels of 2 mm)")
    p.add_argument("--window", type=int, default=32, help="model input size (sliding window)")
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Start the server, load it endpoint by endpoint, print the table, return its rows."""
    from dinov2.serve.process import ServerProcess

    args = get_parser().parse_args(argv)
    endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
    if not set(endpoints) <= {"segment", "embed"} or min(args.requests, args.clients, args.concurrency) < 1:
        raise SystemExit("--endpoints takes segment and/or embed; --requests, --clients, --concurrency must be >= 1")
    with tempfile.TemporaryDirectory(prefix="benchmark-serve-") as tmp:
        root = Path(tmp)
        checkpoint = write_checkpoint(root / "best_model.pth", args)
        volume = write_volume(root / "t1.nii.gz", args.size)
        flags = ["--concurrency", str(args.concurrency), "--device", args.device, "--max-queue", str(args.requests)]
        flags += ["--threads", str(args.server_threads)] if args.server_threads else []
        with ServerProcess(checkpoint, root / "server.log", flags) as server:
            rows = [load_run(server.url, e, volume, args.requests, args.clients) for e in endpoints]
    print(format_table(rows, args))
    return rows


if __name__ == "__main__":
    main()
