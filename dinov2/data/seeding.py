"""Independent, reproducible seed streams for every rank and data-loader worker.

A forked DataLoader worker starts with a copy of its parent's random generators, so unless each
worker reseeds them, all workers draw the same augmentation parameters. Here every stream is
derived from the run seed with ``numpy.random.SeedSequence``, keyed by
``(rank, worker_id, stream)``:

* ``rank`` and ``worker_id`` separate processes that run at the same time;
* ``stream`` separates successive lifetimes of the same worker: PyTorch draws a new base seed
  from the DataLoader's ``generator`` every time an iterator (an epoch, with non-persistent
  workers) starts, and :class:`WorkerInitFn` folds it in, so epochs do not replay each other.
  Seed that generator with :func:`loader_generator` and the whole run is reproducible.

Usage::

    loader = DataLoader(
        dataset, num_workers=4,
        worker_init_fn=WorkerInitFn(run_seed, rank),
        generator=loader_generator(run_seed, rank),
    )
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

_MASK64 = (1 << 64) - 1
# Fixed tags in the spawn key keep the loader generator's stream apart from worker streams.
_LOADER_TAG = 0x4C4F4144  # "LOAD"
_WORKER_TAG = 0x574B5246  # "WKRF"


@dataclass(frozen=True)
class WorkerSeeds:
    """Seeds of one (rank, worker, stream).

    Attributes:
        sequence: root ``SeedSequence``; augmentations spawn their own generators from it.
        torch: seed for ``torch.manual_seed`` (64 bits).
        numpy: seed for the legacy global ``np.random.seed`` (32 bits; MONAI-style code uses it).
        python: seed for ``random.seed`` (64 bits).
    """

    sequence: np.random.SeedSequence
    torch: int
    numpy: int
    python: int


def _check_non_negative(**values: int) -> None:
    for name, value in values.items():
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")


def derive_seeds(run_seed: int, rank: int, worker_id: int, stream: int = 0) -> WorkerSeeds:
    """Derive the seeds of one worker of one rank from the run seed.

    Args:
        run_seed: the run's seed (``train.seed``).
        rank: global rank of the process.
        worker_id: DataLoader worker index (0 for the main process when ``num_workers=0``).
        stream: lifetime of the worker (see the module docstring); 0 for the main process.

    Returns:
        :class:`WorkerSeeds`; different arguments give statistically independent streams.
    """
    _check_non_negative(run_seed=run_seed, rank=rank, worker_id=worker_id, stream=stream)
    sequence = np.random.SeedSequence(
        entropy=int(run_seed), spawn_key=(_WORKER_TAG, int(rank), int(worker_id), int(stream) & _MASK64)
    )
    torch_seed, python_seed = (int(v) for v in sequence.generate_state(2, dtype=np.uint64))
    numpy_seed = int(sequence.generate_state(3, dtype=np.uint32)[2])
    return WorkerSeeds(sequence=sequence, torch=torch_seed, numpy=numpy_seed, python=python_seed)


def child_sequence(sequence: np.random.SeedSequence, index: int) -> np.random.SeedSequence:
    """The ``index``-th child of ``sequence``, as ``spawn`` would make it but without mutating it.

    Lets several consumers (frame pick, augmentation, ...) take independent sub-streams of one
    worker's seed in any order, always getting the same ones.
    """
    return np.random.SeedSequence(entropy=sequence.entropy, spawn_key=tuple(sequence.spawn_key) + (int(index),))


def apply_seeds(seeds: WorkerSeeds, dataset: object | None = None) -> None:
    """Seed Python, NumPy's and torch's global generators, and the dataset's own generators.

    Args:
        seeds: from :func:`derive_seeds`.
        dataset: reseeded through its ``reseed(seeds)`` method when it has one.
    """
    random.seed(seeds.python)
    np.random.seed(seeds.numpy)
    torch.manual_seed(seeds.torch)
    reseed = getattr(dataset, "reseed", None)
    if callable(reseed):
        reseed(seeds)


def loader_generator(run_seed: int, rank: int) -> torch.Generator:
    """A ``torch.Generator`` for ``DataLoader(generator=...)``, seeded from the run seed and rank.

    The DataLoader draws each iterator's worker base seed (and any random sampler order) from
    it, which makes the per-epoch worker streams reproducible.
    """
    _check_non_negative(run_seed=run_seed, rank=rank)
    sequence = np.random.SeedSequence(entropy=int(run_seed), spawn_key=(_LOADER_TAG, int(rank)))
    return torch.Generator().manual_seed(int(sequence.generate_state(1, dtype=np.uint64)[0]))


class WorkerInitFn:
    """Picklable ``worker_init_fn`` giving each worker its own stream (see module docstring).

    Args:
        run_seed: the run's seed.
        rank: global rank of this process.
    """

    def __init__(self, run_seed: int, rank: int) -> None:
        _check_non_negative(run_seed=run_seed, rank=rank)
        self.run_seed = int(run_seed)
        self.rank = int(rank)

    def __call__(self, worker_id: int) -> None:
        info = torch.utils.data.get_worker_info()
        if info is None:
            raise RuntimeError("WorkerInitFn must be called inside a DataLoader worker (as worker_init_fn).")
        # PyTorch sets info.seed = base_seed + worker_id with a base seed drawn per iterator.
        base_seed = (info.seed - worker_id) & _MASK64
        apply_seeds(derive_seeds(self.run_seed, self.rank, worker_id, base_seed), info.dataset)
