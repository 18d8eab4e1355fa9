"""How many DataLoader workers a process can usefully start.

Worker counts in the configs (``train.num_workers: 10`` for pretraining) suit a GPU node. On a
laptop, a 2-core CI runner or a SLURM task with few ``--cpus-per-task``, that many worker
processes only compete with the main process (which runs the model) for the same cores, and each
holds its own copy of the dataset's cache. So the entry points cap the configured value at what
the process may actually run on, and say so once.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def available_cpus() -> int:
    """CPUs this process may run on (at least 1).

    ``os.sched_getaffinity`` honours ``taskset``, SLURM's CPU binding and container CPU sets,
    which ``os.cpu_count`` (every CPU of the machine) does not; it is missing on macOS and
    Windows, where ``os.cpu_count`` is the best answer available.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    return max(count, 1)


def cap_workers(requested: int, what: str) -> int:
    """``requested`` DataLoader workers, lowered to leave one CPU to the main process.

    Workers are processes beside the main one, so at most ``available_cpus() - 1`` of them can
    run without taking a core from it (with one CPU that is 0: load in the main process).

    Args:
        requested: the configured number of workers (0 = load in the main process).
        what: the config key or flag the value came from, named in the log line, e.g.
            ``"train.num_workers"``.

    Returns:
        ``min(requested, available_cpus() - 1)``, never below 0.
    """
    requested = int(requested)
    cpus = available_cpus()
    limit = max(cpus - 1, 0)
    if requested <= limit:
        return max(requested, 0)
    logger.info("%s=%d lowered to %d: %d CPU%s available to this process", what, requested, limit, cpus,
                "" if cpus == 1 else "s")
    return limit
