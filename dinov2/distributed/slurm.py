"""Process placement from SLURM's environment, for tasks started by ``srun`` without torchrun.

An ``sbatch`` script with ``--ntasks-per-node G`` and ``srun python -m dinov2.train.train3d ...``
starts one process per task; each reads its placement here:

=====================  =======================================================
``SLURM_PROCID``       global rank
``SLURM_NTASKS``       world size
``SLURM_LOCALID``      rank on the node (selects the GPU)
``SLURM_NODEID``       index of the node in the allocation (checked, logged)
``SLURM_JOB_NODELIST`` compressed host list; its first host runs rank 0's store
``SLURM_JOB_ID``       fixes the rendezvous port, identical on every task
=====================  =======================================================

:func:`dinov2.distributed.read_launch_env` calls :func:`read_slurm_env` only when none of
torchrun's variables is set, so ``srun torchrun ...`` keeps torchrun's placement.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Mapping

logger = logging.getLogger(__name__)

SLURM_TASK_VARS = ("SLURM_PROCID", "SLURM_NTASKS")
# 10000-29999: below Linux's ephemeral range (32768-60999), where outgoing connections take
# their local ports, and above the well-known ports; 20000 ports make two jobs sharing a node
# collide only when their ids are equal modulo 20000.
PORT_BASE = 10000
PORT_SPAN = 20000
SCONTROL_TIMEOUT_S = 30


@dataclass(frozen=True)
class SlurmPlacement:
    """One SLURM task's placement.

    Attributes:
        rank: global rank (``SLURM_PROCID``).
        world_size: number of tasks (``SLURM_NTASKS``).
        local_rank: rank on this node (``SLURM_LOCALID``).
        node_rank: node index (``SLURM_NODEID``).
        job_id: ``SLURM_JOB_ID``.
        master_addr: first host of the node list.
        master_port: :func:`port_for_job` of ``job_id``.
    """

    rank: int
    world_size: int
    local_rank: int
    node_rank: int
    job_id: str
    master_addr: str
    master_port: int


def port_for_job(job_id: str | int) -> int:
    """The rendezvous port of a job: the same on every task, different for concurrent jobs.

    Args:
        job_id: a SLURM or submitit job id; array ids such as ``"1234_7"`` use all their digits.

    Returns:
        A port in ``[10000, 30000)``.

    Raises:
        ValueError: ``job_id`` holds no digit.
    """
    digits = re.sub(r"\D", "", str(job_id))
    if not digits:
        raise ValueError(f"Job id {job_id!r} holds no digit; cannot derive a rendezvous port from it. "
                         "Set MASTER_ADDR/MASTER_PORT with the other torchrun variables instead.")
    return PORT_BASE + int(digits) % PORT_SPAN


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: ``a[1,2],b`` -> ``["a[1,2]", "b"]``."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"Unbalanced ']' in SLURM node list {text!r}.")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"Unbalanced '[' in SLURM node list {text!r}.")
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_range_set(ranges: str, source: str) -> list[str]:
    """``"001-003,007"`` -> ``["001", "002", "003", "007"]`` (zero padding kept)."""
    out = []
    for item in ranges.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if match is None:
            raise ValueError(f"Cannot read the range {item!r} in SLURM node list {source!r}.")
        first, last = match.group(1), match.group(2) or match.group(1)
        if int(last) < int(first):
            raise ValueError(f"Descending range {item!r} in SLURM node list {source!r}.")
        width = len(first)
        out.extend(str(n).zfill(width) for n in range(int(first), int(last) + 1))
    return out


def _expand_host_pattern(pattern: str, source: str) -> list[str]:
    """Expand every bracket group of one host pattern, in order: ``n[1-2]-ib[0-1]`` -> 4 names."""
    match = re.search(r"\[([^\[\]]*)\]", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[:match.start()], pattern[match.end():]
    tails = _expand_host_pattern(tail, source)
    return [f"{head}{value}{rest}" for value in _expand_range_set(match.group(1), source) for rest in tails]


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a compressed SLURM node list, in SLURM's order, without calling SLURM.

    Example:
        >>> expand_nodelist("gpu[001-002,007],cpu01")
        ['gpu001', 'gpu002', 'gpu007', 'cpu01']

    Args:
        nodelist: the value of ``SLURM_JOB_NODELIST`` (or ``SLURM_NODELIST``).

    Raises:
        ValueError: empty list, unbalanced brackets or unreadable ranges.
    """
    hosts = [h for part in _split_top_level(nodelist.strip()) for h in _expand_host_pattern(part, nodelist)]
    if not hosts:
        raise ValueError(f"SLURM node list {nodelist!r} names no host.")
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a node list: ``scontrol show hostnames`` when SLURM's tools are
    installed (it knows every syntax the cluster accepts), else :func:`expand_nodelist`.

    Raises:
        ValueError: the node list cannot be read.
    """
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        result = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                timeout=SCONTROL_TIMEOUT_S, check=False)
        hosts = result.stdout.split()
        if result.returncode == 0 and hosts:
            return hosts[0]
        logger.warning("'scontrol show hostnames %s' failed (exit %d: %s); expanding the node list in Python",
                       nodelist, result.returncode, result.stderr.strip())
    return expand_nodelist(nodelist)[0]


def _int_var(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError as exc:
        raise ValueError(f"{key}={environ[key]!r} is not an integer; is this a SLURM task started by srun?") from exc


def read_slurm_env(environ: Mapping[str, str] | None = None) -> SlurmPlacement | None:
    """Placement of this SLURM task, or None outside a multi-task SLURM step.

    A task needs ``SLURM_PROCID`` and ``SLURM_NTASKS`` (set by ``srun``). A single task
    (``SLURM_NTASKS=1``) returns None: one process needs no process group, and a batch script
    that runs ``python`` directly then trains as one plain process.

    Args:
        environ: the environment to read (``os.environ`` by default).

    Raises:
        ValueError: a multi-task step with missing or impossible values (no node list, rank out
            of range); the message names the variable.
    """
    environ = os.environ if environ is None else environ
    if not all(key in environ for key in SLURM_TASK_VARS):
        return None
    world_size = _int_var(environ, "SLURM_NTASKS")
    if world_size <= 1:
        return None
    missing = [k for k in ("SLURM_LOCALID", "SLURM_JOB_ID") if k not in environ]
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if nodelist is None:
        missing.append("SLURM_JOB_NODELIST")
    if missing:
        raise ValueError(f"SLURM_NTASKS={world_size} but {', '.join(missing)} unset: start the tasks with srun inside "
                         "an sbatch/salloc allocation, or launch with torchrun instead (docs/launching.md).")
    rank = _int_var(environ, "SLURM_PROCID")
    local_rank = _int_var(environ, "SLURM_LOCALID")
    node_rank = _int_var(environ, "SLURM_NODEID") if "SLURM_NODEID" in environ else 0
    if not 0 <= rank < world_size or local_rank < 0 or node_rank < 0:
        raise ValueError(f"Impossible SLURM placement SLURM_PROCID={rank}, SLURM_NTASKS={world_size}, "
                         f"SLURM_LOCALID={local_rank}, SLURM_NODEID={node_rank}.")
    job_id = environ["SLURM_JOB_ID"]
    return SlurmPlacement(rank=rank, world_size=world_size, local_rank=local_rank, node_rank=node_rank,
                          job_id=job_id, master_addr=first_host(nodelist), master_port=port_for_job(job_id))
