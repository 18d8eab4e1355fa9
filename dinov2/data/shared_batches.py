"""Batches that leave a DataLoader worker through reused shared memory, one block per batch.

PyTorch sends each tensor a worker returns through a fresh shared-memory segment with its own
file descriptor. Profiling the pretraining loader (``scripts/benchmark_data.py``) showed what
that costs: writing a batch into fresh shared memory faults in every page (7-10 ms of CPU per
sample of 2 x 96^3 + 8 x 48^3 float32 crops, a quarter to a third of making the sample), and
each of the batch's seven tensors crossed with its own descriptor (about 0.5 ms each).

Here a worker writes the whole batch into one block of a per-worker pool, so a block's pages
are faulted in once and reused, and a batch crosses with one descriptor. A block is busy from
the moment the worker takes it until the receiving process has dropped every tensor of the
batch: the receiver builds the tensors over a fresh NumPy array, and that array's finaliser
(it runs when the last tensor or view sharing its memory is gone, whoever holds them) marks
the block free in its header. A block whose batch is lost (a worker that dies) stays busy; the
pool then makes a new one.

In the main process (``num_workers=0``) batches are plain tensors: :func:`allocate_batch` and
:func:`for_transfer` leave them alone, and the values are the same bits either way.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Mapping

import torch
from torch.utils.data import get_worker_info

TensorSpecs = Mapping[str, tuple[tuple[int, ...], torch.dtype]]

# Byte 0 of a block's header is its state; 64 bytes keep every tensor after it aligned.
_HEADER = 64
_ALIGN = 64
_FREE, _BUSY = 0, 1
# Blocks get this much room above the batch that asked for one: the number of masked tokens
# varies from batch to batch, and a block that fits only its first batch would soon be replaced.
_HEADROOM = 1.125
_SPARE_BLOCKS = 2  # free blocks a pool keeps beyond what it needs (after a burst of held batches)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _layout(specs: TensorSpecs) -> tuple[dict[str, int], int]:
    """Byte offsets of the tensors of ``specs`` in a block's body, and the bytes they need."""
    offsets, total = {}, 0
    for key, (shape, dtype) in specs.items():
        offsets[key] = total
        total += _aligned(torch.Size(shape).numel() * dtype.itemsize)
    return offsets, total


class _BlockPool:
    """The shared-memory blocks of one worker process: uint8 tensors ``(_HEADER + capacity,)``."""

    def __init__(self) -> None:
        self.blocks: list[torch.Tensor] = []

    def take(self, nbytes: int) -> torch.Tensor:
        """A free block with room for ``nbytes`` after its header, marked busy."""
        free = [b for b in self.blocks if int(b[0]) == _FREE]
        fitting = [b for b in free if b.numel() - _HEADER >= nbytes]
        if fitting:
            block = min(fitting, key=torch.Tensor.numel)
        else:
            block = torch.zeros(_HEADER + _aligned(int(nbytes * _HEADROOM)), dtype=torch.uint8).share_memory_()
        block[0] = _BUSY
        # Free blocks too small for this batch, or beyond a few spares, are released.
        spare = [b for b in fitting if b is not block][:_SPARE_BLOCKS]
        busy = [b for b in self.blocks if b is not block and int(b[0]) == _BUSY]
        self.blocks = [block, *busy, *spare]
        return block


_POOL: tuple[int, _BlockPool] | None = None  # (pid, pool): a forked worker must not reuse its parent's


def _pool() -> _BlockPool:
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), _BlockPool())
    return _POOL[1]


def allocate_batch(specs: TensorSpecs) -> dict[str, torch.Tensor]:
    """Uninitialised tensors for one batch: views of one pooled shared block inside a DataLoader
    worker, new tensors elsewhere.

    Args:
        specs: ``{key: (shape, dtype)}``.

    Returns:
        ``{key: Tensor(shape) of dtype}``, contiguous. In a worker, return the batch through
        :func:`for_transfer` so that it crosses as one block.
    """
    if get_worker_info() is None:
        return {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in specs.items()}
    offsets, nbytes = _layout(specs)
    block = _pool().take(nbytes)
    body = block[_HEADER:]
    out = {}
    for key, (shape, dtype) in specs.items():
        size = torch.Size(shape).numel() * dtype.itemsize
        out[key] = body[offsets[key]:offsets[key] + size].view(dtype).view(shape)
    return out


class SharedBatch:
    """A worker's batch whose tensors lie in one pooled block; unpickles as the batch dict.

    Args:
        block: the uint8 block tensor.
        batch: the batch dict; tensors inside ``block`` cross as offsets into it, anything else
            (ints, None, tensors from elsewhere) is pickled as usual.
    """

    def __init__(self, block: torch.Tensor, batch: Mapping[str, Any]) -> None:
        self.block = block
        # key -> (byte offset in the block, shape, stride, dtype)
        self.entries: dict[str, tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype]] = {}
        self.others: dict[str, Any] = {}
        for key, value in batch.items():
            offset = _offset_in(value, block) if isinstance(value, torch.Tensor) else None
            if offset is None:
                self.others[key] = value
            else:
                self.entries[key] = (offset, tuple(value.shape), value.stride(), value.dtype)
        self.keys = list(batch)

    def __reduce__(self):
        return _received_batch, (self.block.untyped_storage(), self.entries, self.others, self.keys)


def _offset_in(tensor: torch.Tensor, block: torch.Tensor) -> int | None:
    """Byte offset of ``tensor`` in ``block`` when it is a view of the block's memory that fits in
    it (as :func:`allocate_batch` makes them), else None."""
    if tensor.device != block.device or tensor.untyped_storage().data_ptr() != block.untyped_storage().data_ptr():
        return None
    start = tensor.storage_offset() * tensor.element_size()  # the block itself starts its storage
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride())) if tensor.numel() else -1
    return start if start + (last + 1) * tensor.element_size() <= block.numel() else None


def _mark_free(block: torch.Tensor) -> None:
    block[0] = _FREE


def _received_batch(storage: torch.UntypedStorage,
                    entries: Mapping[str, tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype]],
                    others: Mapping[str, Any], keys: list[str]) -> dict[str, Any]:
    """The batch dict in the receiving process (see the module docstring for the block's release)."""
    block = torch.empty(0, dtype=torch.uint8).set_(storage)
    owner = block.numpy()  # a new array object: its finaliser runs when the batch's last tensor goes
    weakref.finalize(owner, _mark_free, block).atexit = False
    memory = torch.from_numpy(owner).untyped_storage()  # every tensor below shares it, so holds ``owner``
    tensors = {key: torch.empty(0, dtype=dtype).set_(memory, offset // dtype.itemsize, shape, stride)
               for key, (offset, shape, stride, dtype) in entries.items()}
    return {key: tensors[key] if key in tensors else others[key] for key in keys}


def for_transfer(batch: dict[str, Any]) -> dict[str, Any] | SharedBatch:
    """The batch as a worker should return it: a :class:`SharedBatch` when its tensors came from
    :func:`allocate_batch` in this worker, else ``batch`` unchanged (main process, or no block)."""
    if get_worker_info() is None or _POOL is None or _POOL[0] != os.getpid():
        return batch
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    for block in _POOL[1].blocks:
        if int(block[0]) == _BUSY and any(_offset_in(t, block) is not None for t in tensors):
            return SharedBatch(block, batch)
    return batch
