"""PretrainDataset3d: caching, per-rank partition, 4D frame pick, per-worker seed streams."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dinov2.data.augmentations import DataAugmentationDINO3d
from dinov2.data.datasets import PretrainDataset3d, build_pretrain_dataset, partition_for_rank
from dinov2.data.seeding import WorkerInitFn, derive_seeds, loader_generator

SMALL = dict(global_crops_size=8, local_crops_size=4, local_crops_number=2)
NO_INTENSITY = dict(intensity_prob=0.0, global1_blur_prob=0.0, global2_blur_prob=0.0, global2_gibbs_prob=0.0, local_blur_prob=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def save_nifti(path, array, spacing=(1.0, 1.0, 1.0)):
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.diag(list(spacing) + [1.0])), str(path))
    return str(path)


@pytest.fixture
def volumes(tmp_path):
    rng = np.random.default_rng(0)
    return [save_nifti(tmp_path / f"v{i}.nii.gz", rng.uniform(0, 100, size=(14, 12, 10))) for i in range(5)]


@pytest.fixture
def series(tmp_path):
    """4D NIfTI whose frames are constant 0, 1, 2, 3, so a crop tells which frame it came from."""
    data = np.stack([np.full((12, 12, 10), t, dtype=np.float32) for t in range(4)], axis=-1)
    return save_nifti(tmp_path / "series.nii.gz", data)


def crops_of(sample):
    return sample["global_crops"] + sample["local_crops"]


def test_sample_contract(volumes):
    dataset = PretrainDataset3d(volumes[:2], DataAugmentationDINO3d(**SMALL), seed=0, rank=0, world_size=1)
    assert len(dataset) == 2 and dataset.cache_mode == "memory"
    sample = dataset[1]
    assert [tuple(c.shape) for c in sample["global_crops"]] == [(1, 8, 8, 8)] * 2
    assert [tuple(c.shape) for c in sample["local_crops"]] == [(1, 4, 4, 4)] * 2
    assert all(type(c) is torch.Tensor and c.dtype == torch.float32 for c in crops_of(sample))


@pytest.mark.parametrize("cache", ["memory", "disk", "none"])
def test_4d_frame_varies_across_accesses_with_the_cache_on(series, tmp_path, cache):
    preprocessing = {"cache": {"mode": cache, "dir": str(tmp_path / "cache") if cache == "disk" else None}}
    augmentation = DataAugmentationDINO3d(**SMALL, **NO_INTENSITY)
    dataset = PretrainDataset3d([series], augmentation, preprocessing, seed=0, rank=0, world_size=1)
    assert tuple(dataset.record(0)["image"].shape[:1]) == (4,)  # the cache keeps every frame
    # Percentile scaling maps the frame levels 0, 1, 2, 3 to -1, -1/3, 1/3, 1.
    frames = [round((float(dataset[0]["global_crops"][0].mean()) + 1) * 1.5) for _ in range(40)]
    assert set(frames) == {0, 1, 2, 3}


def test_disk_cache_folder_follows_the_preprocessing_config(volumes, tmp_path):
    root = tmp_path / "cache"
    make = lambda extra: PretrainDataset3d(  # noqa: E731
        volumes[:1], DataAugmentationDINO3d(**SMALL), {"cache": {"dir": str(root)}, **extra}, seed=0, rank=0, world_size=1
    )
    first = make({})
    first[0]
    files = sorted(p for p in os.listdir(first.cache_dir) if p.endswith(".pt"))
    assert len(files) == 1
    stamp = os.stat(first.cache_dir / files[0]).st_mtime_ns
    again = make({})
    again[0]
    assert again.cache_dir == first.cache_dir
    assert os.stat(again.cache_dir / files[0]).st_mtime_ns == stamp  # reused, not rewritten
    described = json.loads((first.cache_dir / "preprocessing.json").read_text())
    assert described["foreground"]["threshold"] == -0.9
    other = make({"foreground": {"threshold": -0.5}})
    other[0]
    assert other.cache_dir != first.cache_dir and other.cache_dir.parent == root
    assert len([p for p in os.listdir(other.cache_dir) if p.endswith(".pt")]) == 1


def test_partition_is_disjoint_and_complete(volumes):
    entries = [{"image": v} for v in volumes]
    shares = [partition_for_rank(entries, rank, 2, seed=7) for rank in range(2)]
    images = [[e["image"] for e in share] for share in shares]
    assert sorted(len(s) for s in images) == [2, 3]
    assert not set(images[0]) & set(images[1]) and sorted(images[0] + images[1]) == sorted(volumes)
    assert partition_for_rank(entries, 1, 2, seed=7) == shares[1]  # every rank computes the same split
    assert partition_for_rank(entries, 0, 1, seed=7) == entries
    with pytest.raises(ValueError, match="fewer processes"):
        partition_for_rank(entries[:1], 0, 2, seed=0)
    with pytest.raises(ValueError, match="rank"):
        partition_for_rank(entries, 2, 2, seed=0)


def test_each_rank_caches_only_its_share(volumes):
    datasets = [PretrainDataset3d(volumes, DataAugmentationDINO3d(**SMALL), seed=3, rank=r, world_size=2) for r in range(2)]
    sources = [{ds.record(i)["source"] for i in range(len(ds))} for ds in datasets]
    assert len(datasets[0]) + len(datasets[1]) == 5
    assert not sources[0] & sources[1] and sources[0] | sources[1] == set(volumes)


def _loader(dataset, run_seed, workers, indices):
    return DataLoader(
        dataset,
        batch_size=1,
        sampler=indices,
        num_workers=workers,
        collate_fn=lambda batch: batch[0],
        worker_init_fn=WorkerInitFn(run_seed, 0),
        generator=loader_generator(run_seed, 0),
    )


def test_workers_differ_and_the_run_seed_reproduces(volumes):
    dataset = PretrainDataset3d(volumes[:1], DataAugmentationDINO3d(**SMALL), seed=0, rank=0, world_size=1)
    # Index 0 twice: batch 0 is made by worker 0, batch 1 by worker 1.
    first = [crops_of(s) for s in _loader(dataset, 11, 2, [0, 0])]
    assert not any(torch.equal(a, b) for a, b in zip(first[0], first[1])), "two workers repeated each other"
    again = [crops_of(s) for s in _loader(dataset, 11, 2, [0, 0])]
    assert all(torch.equal(a, b) for x, y in zip(first, again) for a, b in zip(x, y))
    other = [crops_of(s) for s in _loader(dataset, 12, 2, [0, 0])]
    assert not torch.equal(first[0][0], other[0][0])


def test_main_process_stream_is_reproducible(volumes):
    make = lambda seed: PretrainDataset3d(volumes[:1], DataAugmentationDINO3d(**SMALL), seed=seed, rank=0, world_size=1)  # noqa: E731
    a, b, c = make(1), make(1), make(2)
    sa, sb, sc = crops_of(a[0]), crops_of(b[0]), crops_of(c[0])
    assert all(torch.equal(x, y) for x, y in zip(sa, sb))
    assert not torch.equal(sa[0], sc[0])
    a.reseed(derive_seeds(1, 0, 0, 0))
    assert all(torch.equal(x, y) for x, y in zip(sa, crops_of(a[0])))


def test_seed_streams_are_distinct():
    seeds = {(r, w, s): derive_seeds(5, r, w, s).torch for r in range(2) for w in range(3) for s in (0, 2**40)}
    assert len(set(seeds.values())) == len(seeds)
    assert derive_seeds(5, 1, 2, 3).torch == derive_seeds(5, 1, 2, 3).torch
    with pytest.raises(ValueError):
        derive_seeds(-1, 0, 0)


def test_build_from_config_and_bad_datalists(volumes, tmp_path):
    cfg = {"crops": {**SMALL, "local_crops_number": 1}, "preprocessing": {"foreground": {"threshold": -0.95}}}
    dataset = build_pretrain_dataset(cfg, volumes[:1], seed=0, rank=0, world_size=1)
    assert len(dataset[0]["local_crops"]) == 1 and dataset.config["foreground"]["threshold"] == -0.95
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        PretrainDataset3d([str(tmp_path / "missing.nii.gz")], DataAugmentationDINO3d(), rank=0, world_size=1)
    with pytest.raises(ValueError, match="empty"):
        PretrainDataset3d([], DataAugmentationDINO3d(), rank=0, world_size=1)
    with pytest.raises(ValueError, match="'image' path"):
        PretrainDataset3d([{"label": volumes[0]}], DataAugmentationDINO3d(), rank=0, world_size=1)
