"""The one place that knows about processes: rank, world size, process group.

Everything else asks these helpers instead of reading environment variables or calling
``torch.distributed`` directly, so the code runs unchanged as one plain process (no group),
under ``torchrun`` or under SLURM.

Launch recipes::

    python -m dinov2.train.train3d ...                          # one process, no group
    torchrun --nproc_per_node 2 -m dinov2.train.train3d ...     # one node, 2 processes
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 \\
        --master_addr HOST --master_port 29500 -m dinov2.train.train3d ...

:func:`init_distributed` reads the launcher's environment through :func:`read_launch_env`,
which knows torchrun's variables and, when none of them is set, SLURM's (``SLURM_PROCID``,
``SLURM_NTASKS``, ... read by :mod:`dinov2.distributed.slurm`) for tasks started by ``srun``.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dinov2.distributed.slurm import read_slurm_env
from dinov2.utils.device import resolve_device
from dinov2.utils.errors import UsageError

logger = logging.getLogger(__name__)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


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


@dataclass(frozen=True)
class LaunchEnv:
    """Process placement as told by the launcher.

    Attributes:
        rank: global rank in ``[0, world_size)``.
        world_size: number of processes over all nodes.
        local_rank: rank on this node (selects the GPU).
        master_addr: host of rank 0's rendezvous store.
        master_port: its port.
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


@dataclass(frozen=True)
class DistributedContext:
    """What :func:`init_distributed` set up.

    Attributes:
        rank, world_size, local_rank: placement (0, 1, 0 for one plain process).
        device: the ``torch.device`` this process computes on.
        backend: ``"nccl"``, ``"gloo"`` or None when no process group was created.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0


def read_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv | None:
    """Placement from torchrun's variables, else from SLURM's (:mod:`dinov2.distributed.slurm`), else None.

    Args:
        environ: the environment to read (``os.environ`` by default).

    Raises:
        UsageError: (a ``ValueError``) when only some of ``RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT``
            are set or they hold impossible values (a half-configured launch would otherwise
            hang at the rendezvous or silently train as one process).
    """
    environ = os.environ if environ is None else environ
    present = [k for k in TORCHRUN_VARS if k in environ]
    if not present:
        # torchrun's variables win (``srun torchrun ...``); else a task started by srun.
        slurm = read_slurm_env(environ)
        if slurm is None:
            return None
        return LaunchEnv(rank=slurm.rank, world_size=slurm.world_size, local_rank=slurm.local_rank,
                         master_addr=slurm.master_addr, master_port=slurm.master_port)
    missing = [k for k in TORCHRUN_VARS if k not in environ]
    if missing:
        raise UsageError(
            f"Incomplete distributed environment: {', '.join(present)} set but {', '.join(missing)} missing. "
            "Launch with torchrun (which sets all of them) or unset them to run as one process "
            "(dinov2/distributed/__init__.py)."
        )
    try:
        env = LaunchEnv(
            rank=int(environ["RANK"]), world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ["LOCAL_RANK"]), master_addr=environ["MASTER_ADDR"],
            master_port=int(environ["MASTER_PORT"]),
        )
    except ValueError as exc:
        raise UsageError(f"Non-integer RANK/WORLD_SIZE/LOCAL_RANK/MASTER_PORT in the environment: {exc}") from exc
    if env.world_size < 1 or not 0 <= env.rank < env.world_size or env.local_rank < 0:
        raise UsageError(
            f"Impossible placement RANK={env.rank}, WORLD_SIZE={env.world_size}, LOCAL_RANK={env.local_rank} "
            "(need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0)."
        )
    return env


DEFAULT_TIMEOUT_MINUTES = 30.0


def collective_timeout_minutes(timeout_minutes: float | None = None) -> float:
    """The collective timeout: the argument, else ``DINOV2_DIST_TIMEOUT_MIN``, else 30 minutes."""
    if timeout_minutes is not None:
        value = float(timeout_minutes)
    else:
        raw = os.environ.get("DINOV2_DIST_TIMEOUT_MIN", str(DEFAULT_TIMEOUT_MINUTES))
        try:
            value = float(raw)
        except ValueError:
            raise UsageError(f"DINOV2_DIST_TIMEOUT_MIN must be a number of minutes, got '{raw}'") from None
    if value <= 0:
        raise UsageError(f"The collective timeout must be positive, got {value} minutes")
    return value


def init_distributed(device: str = "auto", timeout_minutes: float | None = None) -> DistributedContext:
    """Set up this process: pick the device and, under a launcher, join the process group.

    NCCL is used on CUDA, gloo on CPU. Without launcher variables no group is created and the
    helpers above report rank 0 of 1. Calling it again once a group exists returns the current
    context without re-initialising.

    Args:
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (config key ``device``).
        timeout_minutes: collective timeout; a rank stuck longer than this aborts the job
            (default: ``DINOV2_DIST_TIMEOUT_MIN`` or 30 minutes).

    Returns:
        The :class:`DistributedContext` of this process.
    """
    env = read_launch_env()
    if env is None:
        dev = resolve_device(device, 0)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistributedContext(rank=0, world_size=1, local_rank=0, device=dev, backend=None)
    dev = resolve_device(device, env.local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not is_enabled():
        # The store address comes from read_launch_env (torchrun's or SLURM's variables), so it is
        # passed explicitly: env:// would read MASTER_ADDR/MASTER_PORT, which srun does not set.
        host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr  # IPv6 literal
        kwargs = dict(backend=backend, init_method=f"tcp://{host}:{env.master_port}", rank=env.rank,
                      world_size=env.world_size,
                      timeout=datetime.timedelta(minutes=collective_timeout_minutes(timeout_minutes)))
        if dev.type == "cuda":
            kwargs["device_id"] = dev  # binds NCCL communicators to this GPU eagerly
        dist.init_process_group(**kwargs)
        logger.info("Joined process group: rank %d/%d (local %d), backend %s, device %s",
                    env.rank, env.world_size, env.local_rank, backend, dev)
    return DistributedContext(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank,
                              device=dev, backend=backend)


def shutdown_distributed() -> None:
    """Leave the process group, if any (safe to call when none exists or after a failure)."""
    if is_enabled():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank; a no-op for one process."""
    if is_enabled() and get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (a new tensor; the input is unchanged for one process).

    Args:
        tensor: any shape; every rank passes the same shape and dtype.
    """
    if not (is_enabled() and get_world_size() > 1):
        return tensor.clone()
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out / get_world_size()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (a new tensor)."""
    out = tensor.detach().clone()
    if is_enabled() and get_world_size() > 1:
        dist.all_reduce(out)
    return out


def all_gather_object(obj):
    """List of ``obj`` from every rank, indexed by rank (``[obj]`` for one process)."""
    if not (is_enabled() and get_world_size() > 1):
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (itself for one process)."""
    if not (is_enabled() and get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
