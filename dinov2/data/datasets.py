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

A volume that cannot be read mid-run (a file changed, cut short or removed on a shared filesystem
while a week-long run reads it) does not end the run: the sample of entry ``i`` is taken from the
first readable entry among ``i + 1, i + 2, ...`` (cyclically), the file is logged once, and the run
stops with :class:`TooManyBadInputsError` only when more than ``max_bad_fraction`` of the volumes
are unreadable. The replacement depends on the index and on which files are bad, not on which
worker met them first, and it is augmented with the random state the loader set for the sample's
position, so a resumed run draws the very samples the uninterrupted one drew.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import logging
import math
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from nibabel.filebasedimages import ImageFileError
from monai.data import CacheDataset, Dataset as MonaiDataset, PersistentDataset, partition_dataset
from omegaconf import DictConfig

from dinov2 import distributed
from dinov2.data.dicom_series import volume_source
from dinov2.data.seeding import WorkerSeeds, child_sequence, derive_seeds
from dinov2.data.validation import InputVolumeError, find_input_error, read_error
from dinov2.data.transforms import (
    build_preprocessing,
    pick_frame,
    preprocessing_cache_key,
    resolve_preprocessing_config,
)
from dinov2.utils.errors import UsageError, UserError, exception_chain

logger = logging.getLogger(__name__)

DEFAULT_MAX_BAD_FRACTION = 0.05
_SHOWN_BAD = 10  # files listed by name in TooManyBadInputsError
# What a reader raises on a damaged, truncated or vanished file when no InputVolumeError was made of it.
_READ_ERRORS = (EOFError, OSError, zlib.error, gzip.BadGzipFile, ImageFileError)


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
        if not volume_source(item["image"]).exists():  # FOLDER::SERIES: the folder
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


class TooManyBadInputsError(UserError):
    """More volumes could not be read during the run than ``train.max_bad_input_fraction`` tolerates.

    Made from its message alone (see :func:`too_many_bad_inputs`): torch re-creates an exception
    raised in a DataLoader worker as ``type(exc)(text)`` in the main process (``text`` = "Caught
    ... in DataLoader worker process N. Original Traceback ..." followed by this message), and a
    one-argument constructor keeps it a :class:`~dinov2.utils.errors.UserError` there instead of
    a bare ``RuntimeError``. The worker's traceback is cut off again here, so the entry point's
    one ``ERROR:`` line is the message itself.
    """

    def __init__(self, message: str = ""):
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def too_many_bad_inputs(bad: Sequence[InputVolumeError], total: int, fraction: float) -> TooManyBadInputsError:
    """The error for ``bad`` unreadable volumes out of ``total``, listing at most 10 of them.

    Args:
        bad: the read errors, in datalist order.
        total: volumes in the dataset.
        fraction: the tolerated share (``train.max_bad_input_fraction``).
    """
    shown = "; ".join(f"{e.path} ({e.problem})" for e in bad[:_SHOWN_BAD])
    if len(bad) > _SHOWN_BAD:
        shown += f"; and {len(bad) - _SHOWN_BAD} more"
    return TooManyBadInputsError(
        f"{len(bad)} of {total} pretraining volumes could not be read, more than train.max_bad_input_fraction "
        f"({fraction:g}, at most {tolerated_bad_inputs(fraction, total)} volumes) tolerates: {shown}. Check these "
        "files and the filesystem they are on, fix them or remove them from the datalist, and start the run again: "
        "it resumes from its last checkpoint. Or raise train.max_bad_input_fraction to replace more unreadable "
        "volumes by readable ones."
    )


def tolerated_bad_inputs(fraction: float, total: int) -> int:
    """Unreadable volumes a run of ``total`` volumes survives: ``floor(fraction * total)``."""
    # The epsilon keeps e.g. 0.29 * 100 (28.999999999999996 in floating point) at 29.
    return math.floor(fraction * total + 1e-9)


def _check_bad_fraction(value: Any) -> float:
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = math.nan
    if isinstance(value, bool) or not 0.0 <= fraction < 1.0:  # also rejects NaN
        raise UsageError(
            f"train.max_bad_input_fraction (max_bad_fraction) must be a number in [0, 1), got {value!r}: the share "
            "of volumes that may turn out unreadable during the run before it stops (0 stops at the first one)."
        )
    return fraction


def _about_another_file(exc: OSError, image: str) -> bool:
    """Whether an ``OSError`` is not about reading ``image``: a full disk, or another file (the disk cache)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(exc.filename, (str, bytes, os.PathLike)):
        return False  # no file named: a reader's own error while decoding the image
    name, image = os.path.abspath(os.fsdecode(exc.filename)), os.path.abspath(image)
    return name != image and not name.startswith(image + os.sep)  # a DICOM folder's files are the image


def unreadable_input(exc: BaseException, image: str) -> InputVolumeError | None:
    """The :class:`InputVolumeError` (naming ``image``, in words) for a failure to read ``image``.

    Args:
        exc: what reading the entry raised; MONAI's ``RuntimeError("applying transform ...")``
            wrapper is seen through.
        image: the entry's image path.

    Returns:
        The error, or None when ``exc`` is not a read failure of ``image`` (a bug, a full disk,
        an unwritable cache folder): such errors must end the run, not skip the volume.
    """
    found = find_input_error(exc)
    if found is not None:
        return found
    for cause in exception_chain(exc):
        if isinstance(cause, OSError) and _about_another_file(cause, image):
            return None
        if isinstance(cause, _READ_ERRORS):
            return read_error(image, exc)
    return None


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
        max_bad_fraction: share of the volumes, in ``[0, 1)``, that may turn out unreadable while
            the run reads them (``train.max_bad_input_fraction``): each is replaced by the next
            readable entry (see :meth:`readable_record`); one more than
            ``floor(max_bad_fraction * len(self))`` raises :class:`TooManyBadInputsError`.

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
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    ) -> None:
        self.max_bad_fraction = _check_bad_fraction(max_bad_fraction)
        # {index: why its volume cannot be read}, met by this process (each loader worker has its own).
        self._bad: dict[int, InputVolumeError] = {}
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

    @property
    def unreadable(self) -> dict[int, InputVolumeError]:
        """The entries this process could not read, ``{index: error}`` (a copy)."""
        return dict(self._bad)

    def __getitem__(self, index: int) -> dict:
        """DINO crops of entry ``index``, or of its replacement when its volume cannot be read.

        Returns:
            The augmentation's dict, e.g. ``{"global_crops": [Tensor(1, G, G, G)] * 2,
            "local_crops": [Tensor(1, L, L, L)] * N}``.

        Raises:
            TooManyBadInputsError: more unreadable volumes than ``max_bad_fraction`` tolerates.
        """
        record = self.readable_record(index)
        # Drawn only now, after a successful read: a replacement is augmented with the random state
        # the loader set for this position, whatever failed before it.
        volume = pick_frame(record["image"], self._frame_rng)
        return self.augmentation(volume)

    def readable_record(self, index: int) -> dict:
        """:meth:`record` of ``index``, or of the first readable of ``index + 1, index + 2, ...`` (mod ``len``).

        The replacement depends only on ``index`` and on which files are unreadable (not on which
        worker met them first), so a resumed run gets the samples the uninterrupted one got.
        Entries found unreadable before are skipped without reading them again (a file that comes
        back later stays replaced in this process). Each new unreadable file is logged once.

        Returns:
            ``{"image": Tensor(T, H, W, D), "spacing", "source"}`` of the entry used.

        Raises:
            TooManyBadInputsError: more unreadable volumes than ``max_bad_fraction`` tolerates.
            Any other error of the read (a bug, a full disk) unchanged.
        """
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"Index {index} is out of range for a dataset of {n} volumes.")
        index, fresh = int(index) % n, []
        for candidate in ((index + k) % n for k in range(n)):  # bounded: never loops forever
            if candidate in self._bad:
                continue
            try:
                record = self.record(candidate)
            except Exception as exc:  # noqa: BLE001 - only read failures of the file are absorbed
                error = unreadable_input(exc, self.entries[candidate]["image"])
                if error is None:
                    raise
                self._add_unreadable(candidate, error)
                fresh.append(candidate)
                continue
            self._log_replaced(fresh, candidate)
            return record
        raise self._too_many()  # every entry unreadable (unreachable while max_bad_fraction < 1)

    def _add_unreadable(self, index: int, error: InputVolumeError) -> None:
        self._bad[index] = error
        if len(self._bad) > tolerated_bad_inputs(self.max_bad_fraction, len(self)):
            raise self._too_many()

    def _too_many(self) -> TooManyBadInputsError:
        return too_many_bad_inputs([self._bad[i] for i in sorted(self._bad)], len(self), self.max_bad_fraction)

    def _log_replaced(self, indices: Sequence[int], used: int) -> None:
        """One warning per newly unreadable entry; ``used`` replaces each (they lie between it and the request)."""
        for index in indices:
            logger.warning(
                "%s Entry %d (%s) is used in its place; %d of %d volumes unreadable so far in this process "
                "(the run stops above %d: train.max_bad_input_fraction).",
                self._bad[index], used, self.entries[used]["image"], len(self._bad), len(self),
                tolerated_bad_inputs(self.max_bad_fraction, len(self)),
            )


def build_pretrain_dataset(
    cfg: Mapping[str, Any] | DictConfig,
    datalist: str | os.PathLike | Sequence[Mapping[str, Any] | str],
    *,
    seed: int,
    rank: int | None = None,
    world_size: int | None = None,
) -> PretrainDataset3d:
    """Dataset from a training config's ``crops:``, ``preprocessing:`` and ``train.max_bad_input_fraction``.

    Args:
        cfg: training config; absent sections (and keys) take the packaged defaults.
        datalist: entries or datalist JSON path.
        seed: run seed.
        rank: global rank (default from ``dinov2.distributed``).
        world_size: number of processes (default from ``dinov2.distributed``).

    Returns:
        The :class:`PretrainDataset3d` with a ``DataAugmentationDINO3d``.
    """
    from dinov2.data.augmentations import DataAugmentationDINO3d

    augmentation = DataAugmentationDINO3d.from_config(cfg.get("crops") or {}, seed=seed)
    train = cfg.get("train") or {}
    fraction = train.get("max_bad_input_fraction", DEFAULT_MAX_BAD_FRACTION)
    return PretrainDataset3d(
        datalist, augmentation, cfg.get("preprocessing"), seed=seed, rank=rank, world_size=world_size,
        max_bad_fraction=DEFAULT_MAX_BAD_FRACTION if fraction is None else fraction,
    )
