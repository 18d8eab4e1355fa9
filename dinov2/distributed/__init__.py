"""The one place that knows about processes: rank, world size, process group.

Everything else asks these helpers instead of reading environment variables or calling
``torch.distributed`` directly, so the code runs unchanged as one plain process (no group),
under ``torchrun`` or under SLURM.
"""

from __future__ import annotations

import torch.distributed as dist


def is_enabled() -> bool:
    """True when a process group is initialised (torchrun / SLURM); False for one plain process."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    """Number of processes in the group (1 without a process group)."""
    return dist.get_world_size() if is_enabled() else 1


def is_main_process() -> bool:
    """True on global rank 0, the process that logs and writes shared files."""
    return get_rank() == 0
