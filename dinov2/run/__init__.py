"""SLURM submission of the entry points through submitit (``python -m dinov2.run.submit``).

:mod:`dinov2.run.submit` builds and submits the job; :mod:`dinov2.run.submitit_job` holds the
picklable job that runs an entry point's ``main`` on each task and requeues itself.
"""

from dinov2.run.submitit_job import ENTRY_POINTS, EntryPointJob, torchrun_environment

__all__ = ["ENTRY_POINTS", "EntryPointJob", "torchrun_environment"]
