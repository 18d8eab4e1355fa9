"""The pretraining data stream, with every random draw a pure function of (run seed, position).

:class:`~dinov2.data.samplers.InfiniteSampler` defines one global stream of dataset indices;
rank ``r`` of ``W`` reads global positions ``start + r``, ``start + r + W``, ... Here each
sample's randomness (frame pick, crops, augmentations, and anything drawn from the global
Python / NumPy / torch generators) is reseeded from ``(run seed, global position)`` right
before it is made, and each batch's iBOT masks from ``(run seed, position of the batch's first
sample)``. So which worker makes a sample, how far the loader prefetched when the run was
killed, and how many processes share the stream change nothing: resuming at iteration ``k``
rebuilds the loader at global position ``k * global_batch`` and gets the very batches the
uninterrupted run would have got.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dinov2.data.collate import CollateDataAndCast, collate_data_and_cast
from dinov2.data.samplers import InfiniteSampler
from dinov2.data.shared_batches import SharedBatch, allocate_batch, for_transfer
from dinov2.data.seeding import WorkerInitFn, WorkerSeeds, apply_seeds, loader_generator
from dinov2.utils.cpus import cap_workers

# Tags keep the per-sample, per-batch and per-step streams apart although they share the run seed.
_SAMPLE_TAG = 0x534D504C  # "SMPL"
_MASK_TAG = 0x4D41534B  # "MASK"
_STEP_TAG = 0x53544550  # "STEP"


def _sequence(run_seed: int, *key: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(entropy=int(run_seed), spawn_key=tuple(int(k) for k in key))


def sample_seeds(run_seed: int, position: int) -> WorkerSeeds:
    """Seeds of the sample at global stream position ``position`` (see the module docstring)."""
    sequence = _sequence(run_seed, _SAMPLE_TAG, position)
    torch_seed, python_seed = (int(v) for v in sequence.generate_state(2, dtype=np.uint64))
    numpy_seed = int(sequence.generate_state(3, dtype=np.uint32)[2])
    return WorkerSeeds(sequence=sequence, torch=torch_seed, numpy=numpy_seed, python=python_seed)


def seed_training_step(run_seed: int, iteration: int, rank: int) -> None:
    """Seed torch's global generator (stochastic depth) for one training iteration of one rank.

    Reseeding per iteration, instead of carrying the generator state along, makes an
    iteration's random draws independent of everything that ran before it in the process
    (model construction, a checkpoint load), which is what bit-exact resuming needs.
    """
    seed = int(_sequence(run_seed, _STEP_TAG, iteration, rank).generate_state(1, dtype=np.uint64)[0])
    torch.manual_seed(seed)


class PositionedSampler(Sampler[tuple[int, int]]):
    """Yields ``(global position, dataset index)`` pairs of an :class:`InfiniteSampler`.

    Args:
        sampler: the stream; its ``start``, ``rank`` and ``world_size`` fix the positions.
    """

    def __init__(self, sampler: InfiniteSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.sampler.start + self.sampler.rank
        for index in self.sampler:
            yield position, index
            position += self.sampler.world_size


class PositionedDataset(Dataset):
    """Reseeds every random generator from the sample's global position, then returns the sample.

    Args:
        dataset: a map-style dataset; its ``reseed(WorkerSeeds)`` (if any) is called per sample.
        run_seed: ``train.seed``.
    """

    def __init__(self, dataset: Dataset, run_seed: int) -> None:
        self.dataset = dataset
        self.run_seed = int(run_seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> tuple[int, Any]:
        position, index = item
        apply_seeds(sample_seeds(self.run_seed, position), self.dataset)
        return position, self.dataset[index]


class PositionedCollate:
    """Collate ``(position, sample)`` pairs with iBOT masks seeded by the batch's first position.

    Crops are cast to the collate's ``dtype`` here, in the process that makes the batch, whether
    that is a loader worker or the main process, so the batches do not depend on
    ``num_workers``; the training side converts them to its compute dtype
    (:func:`batch_to_device`). In a worker the whole batch is written into one reused
    shared-memory block (:mod:`dinov2.data.shared_batches`).

    Args:
        collate: the configured :class:`~dinov2.data.collate.CollateDataAndCast` (its settings
            are used; its own torch-seeded draw is replaced by the positional one).
        run_seed: ``train.seed``.
        shared_blocks: in a worker, send the batch as one pooled block; False leaves each
            tensor to PyTorch's default transfer (a new shared-memory segment each; for comparison).
    """

    def __init__(self, collate: CollateDataAndCast, run_seed: int, shared_blocks: bool = True) -> None:
        self.collate = collate
        self.run_seed = int(run_seed)
        self.shared_blocks = bool(shared_blocks)

    def __call__(self, items: Sequence[tuple[int, Mapping[str, Any]]]) -> dict[str, Any] | SharedBatch:
        """Returns the collate's dict plus ``positions`` (long ``(B,)``: global stream positions);
        in a worker, wrapped to cross as one block (it unpickles as that dict)."""
        positions = torch.tensor([int(p) for p, _ in items], dtype=torch.long)
        rng = np.random.Generator(np.random.PCG64(_sequence(self.run_seed, _MASK_TAG, int(positions[0]))))
        c = self.collate
        batch = collate_data_and_cast(
            [sample for _, sample in items], mask_ratio_tuple=c.mask_ratio_tuple, mask_probability=c.mask_probability,
            n_tokens_per_side=c.n_tokens_per_side, mask_generator=c.mask_generator, dtype=c.dtype, rng=rng,
            allocate=allocate_batch if self.shared_blocks else None, extra={"positions": positions},
        )
        return for_transfer(batch) if self.shared_blocks else batch


def batch_to_device(batch: Mapping[str, Any], device: torch.device, dtype: torch.dtype = torch.float32
                    ) -> dict[str, Any]:
    """The training side of a batch: its tensors on ``device``, floating ones converted to ``dtype``.

    Crops may arrive in a narrower dtype than the model computes in (``float16`` with
    ``preprocessing.storage_dtype=float16``). They are copied first and converted after, so a
    host-to-GPU copy moves the narrow dtype; ``non_blocking`` overlaps it with the host when the
    loader pinned the batch (``pin_memory`` on CUDA).

    Args:
        batch: a :class:`PositionedCollate` dict (crops ``(N, C, S, S, S)``, masks, indices, ...).
        device: the training device.
        dtype: the dtype the model takes its inputs in (float32; autocast narrows inside).

    Returns:
        A new dict, same keys; tensors already right are passed through without a copy.
    """
    out = dict(batch)
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            out[key] = value.to(dtype) if value.is_floating_point() else value
    return out


def build_train_loader(dataset: Dataset, collate: CollateDataAndCast, *, batch_size: int, run_seed: int,
                       start_position: int, rank: int, world_size: int, num_workers: int,
                       prefetch_factor: int = 2, pin_memory: bool = False) -> DataLoader:
    """An endless loader starting at global stream position ``start_position``.

    Args:
        dataset: the WHOLE datalist's dataset on every rank (the stream is global; see
            :class:`~dinov2.data.samplers.InfiniteSampler`).
        collate: the configured collate (``dinov2.data.collate.make_collate_fn``).
        batch_size: samples per rank per iteration.
        run_seed: ``train.seed``.
        start_position: samples already consumed by the whole job (all ranks), i.e.
            ``iterations done * global batch`` (``InfiniteSampler.position_for``).
        rank, world_size: this process's place.
        num_workers: ``train.num_workers``, loader worker processes (0 = main process); capped
            at the CPUs available minus one (:func:`~dinov2.utils.cpus.cap_workers`). The batches
            do not depend on it (every draw is seeded by position).
        prefetch_factor: batches each worker prepares ahead.
        pin_memory: page-locked batches for faster, asynchronous host-to-GPU copies (CUDA).

    Returns:
        A DataLoader yielding the dicts of :class:`PositionedCollate`, crops in the collate's
        ``dtype`` (convert them with :func:`batch_to_device`).
    """
    if batch_size < 1:
        raise ValueError(f"train.batch_size_per_gpu must be >= 1, got {batch_size}.")
    stream = InfiniteSampler(len(dataset), shuffle=True, seed=run_seed, rank=rank, world_size=world_size,
                             start=start_position)
    num_workers = cap_workers(num_workers, "train.num_workers")
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs = dict(prefetch_factor=prefetch_factor, persistent_workers=True,
                      worker_init_fn=WorkerInitFn(run_seed, rank))
    return DataLoader(
        PositionedDataset(dataset, run_seed),
        batch_size=batch_size,
        sampler=PositionedSampler(stream),
        num_workers=num_workers,
        collate_fn=PositionedCollate(collate, run_seed),
        pin_memory=pin_memory,
        drop_last=True,
        generator=loader_generator(run_seed, rank),
        **kwargs,
    )
