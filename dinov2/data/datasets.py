"""Pretraining dataset: cached deterministic preprocessing, then a random frame and DINO crops.

``PretrainDataset3d[i]`` = ``augmentation(pick_frame(cache[i]["image"]))``, where ``cache`` holds the
output of :func:`dinov2.data.transforms.build_preprocessing` for this rank's share of the datalist:

* on disk (MONAI ``PersistentDataset``) under ``<cache.dir>/preprocessing-<hash>/`` when a cache
  folder is given; the hash covers every preprocessing option, so changing one starts a new
  folder instead of reading stale volumes, and each file's key covers its path, size and
  modification time;
* in RAM (MONAI ``CacheDataset``, filled at construction) otherwise;
* or not at all (``cache.mode: none``), re-reading every file at every access.

Under ``torch.distributed`` the datalist is split between ranks (MONAI ``partition_dataset``,
shuffled with the run seed so every rank computes the same split), so no rank loads or caches
another rank's volumes; the sampler should therefore draw from this dataset's local indices only.
A sampler that defines one global stream over the whole datalist (so a run can resume on a
different number of processes) needs every rank to hold everything: pass ``rank=0,
world_size=1``, preferably with the disk cache, which every rank then shares and fills lazily.

The frame pick and the augmentation run after the cache and draw from generators that
:meth:`PretrainDataset3d.reseed` resets per worker (``dinov2.data.seeding.WorkerInitFn``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from monai.data import CacheDataset, Dataset as MonaiDataset, PersistentDataset, partition_dataset
from omegaconf import DictConfig

from dinov2 import distributed
from dinov2.data.seeding import WorkerSeeds, child_sequence, derive_seeds
from dinov2.data.validation import InputVolumeError
from dinov2.data.transforms import (
    build_preprocessing,
    pick_frame,
    preprocessing_cache_key,
    resolve_preprocessing_config,
)


def normalise_datalist(datalist: str | os.PathLike | Sequence[Mapping[str, Any] | str]) -> list[dict]:
    """Pretraining entries as a list of dicts with an ``"image"`` path.

    Args:
        datalist: a list of ``{"image": path, ...}`` dicts or of paths, or the path of a
            datalist JSON (read by ``dinov2.data.datalist.load_pretrain_datalist``).

    Returns:
        A new list of dicts; other keys of the entries (``shape``, ``spacing``) are kept.

    Raises:
        FileNotFoundError: an image does not exist.
        InputVolumeError: an image is an empty file. (Unreadable, 2D/5D or all-NaN volumes are
            reported when read: :class:`~dinov2.data.validation.LoadVolumed` and
            :class:`~dinov2.data.transforms.ReplaceNonFinited` raise ``InputVolumeError`` naming
            the file, which MONAI wraps in ``RuntimeError("applying transform ...")``;
            :func:`~dinov2.data.validation.find_input_error` finds it.)
    """
    if isinstance(datalist, (str, os.PathLike)):
        from dinov2.data.datalist import load_pretrain_datalist  # the JSON format lives there

        datalist = load_pretrain_datalist(datalist)
    entries = []
    for position, entry in enumerate(datalist):
        item = {"image": entry} if isinstance(entry, (str, os.PathLike)) else dict(entry)
        image = item.get("image")
        if not isinstance(image, (str, os.PathLike)):
            raise ValueError(
                f"Datalist entry {position} needs an 'image' path (one file or DICOM folder per volume), got {entry!r}."
            )
        item["image"] = os.fspath(image)
        if not os.path.exists(item["image"]):
            raise FileNotFoundError(f"Datalist entry {position}: image {item['image']} does not exist. Fix the datalist.")
        if os.path.isfile(item["image"]) and os.path.getsize(item["image"]) == 0:
            raise InputVolumeError(item["image"], f"datalist entry {position} is an empty file (0 bytes)",
                                   "copy it again or remove it from the datalist")
        entries.append(item)
    if not entries:
        raise ValueError("The pretraining datalist is empty: give at least one volume.")
    return entries


def partition_for_rank(entries: Sequence[dict], rank: int, world_size: int, seed: int) -> list[dict]:
    """This rank's disjoint share of the datalist.

    Shuffled with ``seed`` (the same on every rank, so the shares are complementary) to spread
    sources that are grouped in the datalist; shares differ in size by at most one and are
    never padded with another rank's entries.

    Args:
        entries: the whole datalist.
        rank: this process's global rank, ``0 <= rank < world_size``.
        world_size: number of processes.
        seed: the run seed.

    Returns:
        The entries of ``rank``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}.")
    if world_size == 1:
        return list(entries)
    if len(entries) < world_size:
        raise ValueError(
            f"The datalist has {len(entries)} volumes for {world_size} processes: every rank needs at least one. "
            "Use fewer processes or more volumes."
        )
    return list(partition_dataset(list(entries), num_partitions=world_size, shuffle=True, seed=int(seed))[rank])


def _entry_hash(item: Mapping[str, Any]) -> bytes:
    """Disk cache key of one entry: its content plus the image's size and modification time."""
    stat = os.stat(item["image"])
    payload = json.dumps({"entry": item, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest().encode()


def _write_cache_description(folder: Path, config: dict) -> None:
    """Leave the options next to the cached files, for people (written atomically)."""
    target = folder / "preprocessing.json"
    if target.exists():
        return
    tmp = folder / f".preprocessing.json.{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp, target)


class PretrainDataset3d(torch.utils.data.Dataset):
    """Cached preprocessed volumes of this rank, returned as DINO multi-crop samples.

    Args:
        datalist: entries (see :func:`normalise_datalist`).
        augmentation: callable ``(1, H, W, D) tensor -> {"global_crops": [...], "local_crops": [...]}``,
            e.g. ``DataAugmentationDINO3d``; reseeded per worker if it has ``reseed``.
        preprocessing: the ``preprocessing:`` config (missing keys take the packaged defaults).
        seed: run seed: partition order and the initial (main-process) random streams.
        rank: global rank; default from ``dinov2.distributed``.
        world_size: number of processes; default from ``dinov2.distributed``.
        progress: show a progress bar while filling the in-memory cache.

    Example:
        >>> ds = PretrainDataset3d([{"image": "brain.nii.gz"}], DataAugmentationDINO3d())  # doctest: +SKIP
        >>> sample = ds[0]  # {"global_crops": [Tensor(1, 96, 96, 96)] * 2, "local_crops": [...] * 8}
    """

    def __init__(
        self,
        datalist: str | os.PathLike | Sequence[Mapping[str, Any] | str],
        augmentation: Callable[[torch.Tensor], dict],
        preprocessing: Mapping[str, Any] | DictConfig | None = None,
        *,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        progress: bool = False,
    ) -> None:
        self.rank = distributed.get_rank() if rank is None else int(rank)
        self.world_size = distributed.get_world_size() if world_size is None else int(world_size)
        self.seed = int(seed)
        self.config = resolve_preprocessing_config(preprocessing)
        self.cache_key = preprocessing_cache_key(self.config)
        self.entries = partition_for_rank(normalise_datalist(datalist), self.rank, self.world_size, self.seed)
        self.augmentation = augmentation
        chain = build_preprocessing(self.config)
        cache = self.config["cache"]
        mode = cache["mode"] if cache["mode"] != "auto" else ("disk" if cache["dir"] else "memory")
        self.cache_mode = mode
        self.cache_dir: Path | None = None
        if mode == "disk":
            self.cache_dir = Path(cache["dir"]) / f"preprocessing-{self.cache_key}"
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            description = {k: v for k, v in self.config.items() if k != "cache"}
            _write_cache_description(self.cache_dir, description)
            self._base = PersistentDataset(self.entries, transform=chain, cache_dir=self.cache_dir, hash_func=_entry_hash)
        elif mode == "memory":
            # copy_cache=False: nothing after the cache writes into the cached tensors (the
            # frame pick is a view, the crops are new tensors), so a per-access copy is waste.
            self._base = CacheDataset(
                self.entries,
                transform=chain,
                cache_rate=1.0,
                num_workers=max(1, int(cache["num_workers"])),
                progress=progress,
                copy_cache=False,
            )
        else:
            self._base = MonaiDataset(self.entries, transform=chain)
        self.reseed(derive_seeds(self.seed, self.rank, 0, 0))

    def reseed(self, seeds: WorkerSeeds) -> None:
        """Reset the frame-pick generator and the augmentation's generators from ``seeds``."""
        self._frame_rng = np.random.Generator(np.random.PCG64(child_sequence(seeds.sequence, 0)))
        reseed = getattr(self.augmentation, "reseed", None)
        if callable(reseed):
            reseed(child_sequence(seeds.sequence, 1))

    def __len__(self) -> int:
        return len(self.entries)

    def record(self, index: int) -> dict:
        """The cached preprocessing output ``{"image": Tensor(T, H, W, D), "spacing", "source"}``."""
        return self._base[index]

    def __getitem__(self, index: int) -> dict:
        volume = pick_frame(self.record(index)["image"], self._frame_rng)
        return self.augmentation(volume)


def build_pretrain_dataset(
    cfg: Mapping[str, Any] | DictConfig,
    datalist: str | os.PathLike | Sequence[Mapping[str, Any] | str],
    *,
    seed: int,
    rank: int | None = None,
    world_size: int | None = None,
) -> PretrainDataset3d:
    """Dataset from a training config's ``crops:`` and ``preprocessing:`` sections.

    Args:
        cfg: training config; absent sections take the packaged defaults.
        datalist: entries or datalist JSON path.
        seed: run seed.
        rank: global rank (default from ``dinov2.distributed``).
        world_size: number of processes (default from ``dinov2.distributed``).

    Returns:
        The :class:`PretrainDataset3d` with a ``DataAugmentationDINO3d``.
    """
    from dinov2.data.augmentations import DataAugmentationDINO3d

    augmentation = DataAugmentationDINO3d.from_config(cfg.get("crops") or {}, seed=seed)
    return PretrainDataset3d(
        datalist, augmentation, cfg.get("preprocessing"), seed=seed, rank=rank, world_size=world_size
    )
