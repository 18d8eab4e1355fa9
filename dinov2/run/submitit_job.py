"""The job that submitit pickles and runs on every task: one entry point's ``main(argv)``.

It holds only the entry point's name and its command line, never training state: on
preemption or timeout :meth:`EntryPointJob.checkpoint` resubmits the same command, and the
entry point resumes from the latest checkpoint in its output folder (``train3d`` always does;
``segmentation3d`` with ``train.resume``, its default).

Each task translates submitit's view of the allocation into torchrun's variables before calling
``main``, so the entry point joins its process group through the same
:func:`dinov2.distributed.init_distributed` code path as under ``torchrun``.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Sequence

import submitit

from dinov2.distributed.slurm import port_for_job

logger = logging.getLogger(__name__)

# Entry point name (the first argument of ``python -m dinov2.run.submit``) -> module with ``main(argv)``.
ENTRY_POINTS = {
    "train3d": "dinov2.train.train3d",
    "segmentation3d": "dinov2.eval.segmentation.finetune",  # python -m dinov2.eval.segmentation
    "linear3d": "dinov2.eval.linear.run",  # python -m dinov2.eval.linear
    "vis_pca": "dinov2.eval.visualisation.run",  # python -m dinov2.eval.visualisation
}
# Entry points that split their work over several processes; the others run as one process.
MULTI_PROCESS_ENTRY_POINTS = ("train3d",)


def torchrun_environment(job_env) -> dict[str, str]:
    """torchrun's variables for one task of a submitit job.

    Args:
        job_env: a ``submitit.JobEnvironment`` (or any object with ``global_rank``, ``local_rank``,
            ``num_tasks``, ``hostnames`` and ``job_id``).

    Returns:
        ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` (the job's first host) and
        ``MASTER_PORT`` (:func:`dinov2.distributed.slurm.port_for_job`), or an empty dict for a
        one-task job, which runs as one plain process without a process group.
    """
    if int(job_env.num_tasks) <= 1:
        return {}
    return {
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        "MASTER_ADDR": str(job_env.hostnames[0]),
        "MASTER_PORT": str(port_for_job(job_env.job_id)),
    }


class EntryPointJob:
    """A picklable call of ``<entry point>.main(argv)`` that requeues itself.

    Args:
        entry_point: a key of :data:`ENTRY_POINTS` (``train3d``, ``segmentation3d``, ...).
        argv: the entry point's command line (must name its output folder, where it resumes from).

    Raises:
        ValueError: unknown entry point.

    Example:
        >>> job = EntryPointJob("train3d", ["--config-file", "configs/tiny_cpu.yaml", "--output-dir", "out"])
        >>> submitit.LocalExecutor("out/submitit/%j").submit(job)  # doctest: +SKIP
    """

    def __init__(self, entry_point: str, argv: Sequence[str]):
        if entry_point not in ENTRY_POINTS:
            raise ValueError(f"Unknown entry point '{entry_point}'; choose one of {', '.join(ENTRY_POINTS)}.")
        self.entry_point = entry_point
        self.argv = [str(a) for a in argv]

    def __call__(self) -> int:
        """Run the entry point on this task.

        Returns:
            The entry point's exit code (0).

        Raises:
            RuntimeError: the entry point returned a non-zero code (submitit then marks the job failed).
        """
        job_env = submitit.JobEnvironment()
        launch = torchrun_environment(job_env)
        os.environ.update(launch)
        logger.info("%s: task %d/%d of job %s, entry point %s", job_env.hostname, job_env.global_rank,
                    job_env.num_tasks, job_env.job_id, self.entry_point)
        module = importlib.import_module(ENTRY_POINTS[self.entry_point])
        code = module.main(self.argv)
        if code not in (0, None):
            raise RuntimeError(f"{ENTRY_POINTS[self.entry_point]}.main exited with code {code}; see this task's log.")
        return 0

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption or timeout (rank 0): requeue the same command.

        The state to resume lives in the entry point's output folder (its periodic checkpoints),
        so the resubmitted job is this one, unchanged.
        """
        logger.warning("Job preempted or timed out: requeuing %s, which resumes from its latest checkpoint",
                       self.entry_point)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def __repr__(self) -> str:
        return f"EntryPointJob({self.entry_point!r}, {self.argv!r})"
