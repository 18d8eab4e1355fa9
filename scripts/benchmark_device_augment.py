"""``crops.augment_on_device`` on CPU: ``python scripts/benchmark.py device-augment``.

Samples per CPU-second, one process, one thread, on one real 1 mm brain volume (default: a
template shipped by an installed package), of four ways to turn a batch of ``B`` samples into
crop-major batches of crops (iBOT masks, the same in every path, left out):

* **today**: ``DataAugmentationDINO3d`` per sample (what a loader worker runs), then the
  collate's crop-major stack;
* **boxes + per-crop kernels**: the worker side of ``augment_on_device`` (draw, cut one box per
  sample, collate the draws) then :func:`dinov2.data.device_augment.make_crops` on the CPU,
  which applies the per-sample pipeline's kernels crop by crop (its CPU default);
* **boxes + vectorised kernels**: the same with the vectorised form an accelerator runs
  (``vectorised=True``), on the CPU;
* **worker side only**: draw, cut, collate, plus the one copy of the boxes a worker makes into
  shared memory: the loader's whole per-sample work when the crops are made on a GPU.

The paths alternate in rounds (``samples_per_cpu_second`` of ``scripts/benchmark_data.py``) so a
change of load on a shared machine hits all alike; the load average is printed beside them.
Prints a Markdown table and returns the figures.

Usage::

    python scripts/benchmark.py device-augment --seconds 20
    python scripts/benchmark.py device-augment --volume brain.nii.gz --batch-size 8
    python scripts/benchmark.py device-augment --crops global_crops_size=32 local_crops_size=16
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path
from typing import Sequence

import torch
import yaml

from dinov2.data.augmentations import DataAugmentationDINO3d
from dinov2.data.crop_boxes import collate_crop_boxes
from dinov2.data.device_augment import make_crops
from dinov2.data.transforms import build_preprocessing


def _benchmark_data():
    """``scripts/benchmark_data.py`` (its template finder and alternating-rounds timer), loaded by path."""
    path = Path(__file__).with_name("benchmark_data.py")
    spec = importlib.util.spec_from_file_location("benchmark_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _today(aug: DataAugmentationDINO3d, volume: torch.Tensor, batch: int):
    def run() -> None:
        samples = [aug(volume) for _ in range(batch)]
        for key in ("global_crops", "local_crops"):
            torch.stack([s[key][i] for i in range(len(samples[0][key])) for s in samples])
    return run


def _boxes(cutter: DataAugmentationDINO3d, volume: torch.Tensor, batch: int, vectorised: bool | None):
    def run() -> None:
        crop_boxes = collate_crop_boxes([cutter(volume) for _ in range(batch)])
        if vectorised is None:  # the worker's copy into the shared batch buffer
            [box.clone() for box in crop_boxes["boxes"]]
        else:
            make_crops(crop_boxes, "cpu", vectorised=vectorised)
    return run


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the measurement, print a Markdown table, return ``{path: {cpu, wall, ratio}}``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volume", type=Path, default=None,
                        help="3D NIfTI to sample (default: a 1 mm template from the installed packages)")
    parser.add_argument("--seconds", type=float, default=20.0, help="CPU-seconds per path, in 5 alternating rounds")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per batch")
    parser.add_argument("--crops", nargs="*", default=[], metavar="KEY=VALUE",
                        help="crops settings with YAML values, e.g. local_crops_number=4 region_scale=[0.1,0.2] "
                             "(default: the packaged crops)")
    args = parser.parse_args(argv)
    helpers = _benchmark_data()
    volume_path = args.volume or helpers.find_template()
    if not volume_path.is_file():
        raise FileNotFoundError(f"--volume {volume_path} does not exist.")
    settings = dict(_parse_setting(item) for item in args.crops)

    torch.set_num_threads(1)
    volume = build_preprocessing()({"image": str(volume_path)})["image"][:1].as_subclass(torch.Tensor)
    print(f"Volume: {volume_path} -> (C, H, W, D) = {tuple(volume.shape)}, batch {args.batch_size}, "
          f"crops settings {settings or 'packaged'}")
    load_before = os.getloadavg()[0]
    aug = DataAugmentationDINO3d(**settings, seed=0)
    cutter = DataAugmentationDINO3d(**settings, augment_on_device=True, seed=0)
    paths = {
        "today: per-sample pipeline + stack": _today(aug, volume, args.batch_size),
        "boxes + per-crop kernels (CPU default)": _boxes(cutter, volume, args.batch_size, False),
        "boxes + vectorised kernels": _boxes(cutter, volume, args.batch_size, True),
        "worker side only (draw, cut, copy)": _boxes(cutter, volume, args.batch_size, None),
    }
    rates = helpers.samples_per_cpu_second(paths, args.seconds)
    load_after = os.getloadavg()[0]
    reference = rates["today: per-sample pipeline + stack"][0]
    print(f"Load average {load_before:.2f} before, {load_after:.2f} after, on {os.cpu_count()} CPUs\n")
    print("| path (1 process, 1 thread) | samples / CPU-s | samples / wall-s | vs today |")
    print("|---|---:|---:|---:|")
    results = {}
    for name, (cpu, wall) in rates.items():
        # samples_per_cpu_second counts calls; each call makes a batch.
        cpu, wall = cpu * args.batch_size, wall * args.batch_size
        results[name] = dict(cpu=cpu, wall=wall, ratio=cpu / (reference * args.batch_size))
        print(f"| {name} | {cpu:.2f} | {wall:.2f} | {results[name]['ratio']:.2f}x |")
    return results


def _parse_setting(item: str) -> tuple[str, object]:
    """``key=value`` with a YAML value (``local_crops_number=2``, ``blur_sigma=[0.5,1]``)."""
    key, _, value = item.partition("=")
    return key.strip(), yaml.safe_load(value)


if __name__ == "__main__":
    main()
