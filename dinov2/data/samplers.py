"""Samplers whose order is defined globally, so a run can resume on a different number of processes.

:class:`InfiniteSampler` (pretraining) defines ONE global stream of dataset indices: pass ``p``
is a permutation of ``range(size)`` seeded by ``(seed, p)``, and the stream is pass 0, then
pass 1, ... Global position ``g`` is element ``g % size`` of pass ``g // size``. Rank ``r`` of
``W`` processes reads positions ``start + r``, ``start + r + W``, ... so, with every rank
drawing the same number of samples per step (lock step), the first ``K`` samples consumed by
all ranks together are exactly global positions ``start .. start + K - 1``, whatever ``W``.
Resuming from position ``K`` with any other number of processes continues the same stream
without repeating or skipping a sample.

The sampler cannot count consumption itself: a DataLoader draws indices ahead of the training
step (``prefetch_factor * num_workers`` batches). The training loop therefore records its
progress, ``iteration * global_batch_size`` (see :meth:`InfiniteSampler.position_for`), with
:meth:`InfiniteSampler.set_global_position` before :meth:`InfiniteSampler.state_dict`, or passes
it as ``start`` when it rebuilds the sampler.

:class:`EpochSampler` (evaluation, finetuning epochs) shards one epoch over the ranks so that
every index appears exactly once over all ranks.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from dinov2 import distributed

# Permutation slices handed out per Python list conversion: bounds the memory of .tolist() for
# very large datasets while keeping the per-index overhead low.
_YIELD_CHUNK = 65536


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    rank = distributed.get_rank() if rank is None else int(rank)
    world_size = distributed.get_world_size() if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"Need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
    return rank, world_size


def _pass_permutation(size: int, seed: int, pass_index: int, shuffle: bool) -> torch.Tensor:
    """Indices of one pass over the dataset, ``(size,)`` int64: ``randperm`` seeded by ``(seed, pass)``."""
    if not shuffle:
        return torch.arange(size)
    # SeedSequence mixes (seed, pass) into well-separated 64-bit seeds: seed + pass would make
    # run seed 0 pass 1 identical to run seed 1 pass 0.
    pass_seed = int(np.random.SeedSequence([seed, pass_index]).generate_state(1, dtype=np.uint64)[0])
    generator = torch.Generator().manual_seed(pass_seed)
    return torch.randperm(size, generator=generator)


class InfiniteSampler(Sampler[int]):
    """Endless, process-count-independent stream of dataset indices for pretraining.

    Args:
        size: number of samples in the dataset.
        shuffle: draw a new seeded permutation per pass; ``False`` repeats ``0 .. size - 1``.
        seed: non-negative seed of the stream; pass ``p`` is seeded by ``(seed, p)``.
        rank: this process's rank; ``None`` asks :func:`dinov2.distributed.get_rank`.
        world_size: number of processes; ``None`` asks :func:`dinov2.distributed.get_world_size`.
        start: global position (samples already consumed by all ranks) to begin at.

    Example:
        >>> import itertools
        >>> list(itertools.islice(InfiniteSampler(5, shuffle=False, rank=1, world_size=2), 4))
        [1, 3, 0, 2]
    """

    def __init__(
        self,
        size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        start: int = 0,
    ) -> None:
        if size < 1:
            raise ValueError(f"InfiniteSampler needs a non-empty dataset, got size={size}; check the datalist.")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}.")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}.")
        self.size = int(size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.start = int(start)
        self.global_position = int(start)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, shuffle={self.shuffle}, seed={self.seed}, "
            f"rank={self.rank}, world_size={self.world_size}, start={self.start})"
        )

    @staticmethod
    def position_for(iteration: int, global_batch_size: int) -> int:
        """Global samples consumed after ``iteration`` steps of ``global_batch_size`` (all ranks together).

        Args:
            iteration: completed training iterations.
            global_batch_size: samples per iteration summed over ranks (per-rank batch × world size).

        Returns:
            The global position to record or to resume from.
        """
        if iteration < 0 or global_batch_size < 1:
            raise ValueError(
                f"Need iteration >= 0 and global_batch_size >= 1, got {iteration} and {global_batch_size}."
            )
        return int(iteration) * int(global_batch_size)

    def __iter__(self) -> Iterator[int]:
        """Yields this rank's indices from global position ``start + rank`` onwards, stride ``world_size``."""
        position = self.start + self.rank
        while True:
            pass_index, offset = divmod(position, self.size)
            own = _pass_permutation(self.size, self.seed, pass_index, self.shuffle)[offset :: self.world_size]
            for begin in range(0, own.numel(), _YIELD_CHUNK):
                yield from own[begin : begin + _YIELD_CHUNK].tolist()
            position += own.numel() * self.world_size

    def set_global_position(self, global_position: int) -> None:
        """Records the global samples consumed so far (e.g. ``position_for(iteration, global_batch)``)."""
        if global_position < 0:
            raise ValueError(f"global_position must be >= 0, got {global_position}.")
        self.global_position = int(global_position)

    def state_dict(self) -> dict[str, int]:
        """Returns ``{"global_position", "seed", "size", "shuffle"}``.

        ``global_position`` is the value last given to :meth:`set_global_position` (``start``
        before that): the training loop must record ``iteration * global_batch_size`` first,
        because indices already drawn by the DataLoader's prefetching were not trained on.
        """
        return {
            "global_position": self.global_position,
            "seed": self.seed,
            "size": self.size,
            "shuffle": int(self.shuffle),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues the stream from ``state["global_position"]`` at the next ``iter()``.

        Raises:
            ValueError: if the seed, dataset size or shuffle flag differ from the saved ones,
                since the saved position would then point into a different stream.
        """
        for key in ("seed", "size", "shuffle"):
            if key in state and int(state[key]) != int(getattr(self, key)):
                raise ValueError(
                    f"Sampler state was saved with {key}={state[key]} but this sampler has "
                    f"{key}={getattr(self, key)}; resume with the same datalist and train.seed, "
                    "or start a new run."
                )
        if "global_position" not in state:
            raise ValueError(f"Sampler state lacks 'global_position' (keys: {sorted(state)}); not a sampler state.")
        self.set_global_position(int(state["global_position"]))
        self.start = self.global_position


class EpochSampler(Sampler[int]):
    """One epoch sharded over ranks: every index exactly once over all ranks.

    Rank ``r`` takes positions ``r, r + W, ...`` of the epoch's order (``0 .. size - 1``, or a
    seeded permutation per epoch with ``shuffle=True``). Shards are not padded, so ranks may
    differ by one sample: evaluation that gathers results must allow uneven shards. With
    ``pad=True`` the order is extended by repeating its first indices until ``size`` is a multiple
    of ``W`` (equal shards for collectives, at the price of a few duplicates to drop).

    Args:
        size: number of samples in the dataset.
        shuffle: permute the order, seeded by ``(seed, epoch)``; ``False`` for evaluation.
        seed: non-negative seed of the permutations.
        rank: this process's rank; ``None`` asks :func:`dinov2.distributed.get_rank`.
        world_size: number of processes; ``None`` asks :func:`dinov2.distributed.get_world_size`.
        pad: repeat indices so that all ranks get the same number.
    """

    def __init__(
        self,
        size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        pad: bool = False,
    ) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}.")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}.")
        self.size = int(size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.pad = bool(pad)
        if self.pad and self.size == 0:
            raise ValueError("pad=True needs a non-empty dataset to repeat indices from.")
        self.epoch = 0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, shuffle={self.shuffle}, seed={self.seed}, "
            f"rank={self.rank}, world_size={self.world_size}, pad={self.pad})"
        )

    def set_epoch(self, epoch: int) -> None:
        """Selects the permutation of ``epoch`` (only matters with ``shuffle=True``)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}.")
        self.epoch = int(epoch)

    def _padded_size(self) -> int:
        if not self.pad:
            return self.size
        return -(-self.size // self.world_size) * self.world_size

    def __len__(self) -> int:
        """Number of indices this rank yields."""
        return len(range(self.rank, self._padded_size(), self.world_size))

    def __iter__(self) -> Iterator[int]:
        if self.size == 0:
            return iter(())
        order = _pass_permutation(self.size, self.seed, self.epoch, self.shuffle)
        extra = self._padded_size() - self.size
        if extra:
            # Wrap around so padding works even when extra > size (tiny datasets, many ranks).
            order = torch.cat([order, order.repeat(-(-extra // self.size))[:extra]])
        return iter(order[self.rank :: self.world_size].tolist())
