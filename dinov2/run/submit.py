"""Submit a training or evaluation entry point to SLURM through submitit (one task per GPU).

Usage::

    python -m dinov2.run.submit train3d --nodes 2 --gpus-per-node 8 --partition gpu --timeout 2880 \\
        --output-dir /shared/runs/vitl -- --config-file configs/my_run.yaml train.datalist=/shared/pretrain.json
    # print the sbatch script instead of submitting
    python -m dinov2.run.submit train3d ... --dry-run -- ...
    # run the same job here through submitit's local executor (one node), waiting for it
    python -m dinov2.run.submit train3d --local --gpus-per-node 0 --timeout 30 --output-dir out -- ...

Everything after ``--`` is the entry point's own command line; ``--output-dir`` is given once,
before ``--``, and passed on to the entry point. submitit's scripts, pickles and one log per task
go to ``<output-dir>/submitit/<job id>/`` (with ``--local``: ``<output-dir>/submitit/local-<time>-<pid>/``,
see :func:`local_log_folder`). A preempted or timed-out job requeues itself (SLURM
sends ``USR2`` ``--slurm-signal-delay-s`` seconds before the end) and the entry point resumes
from the latest checkpoint in ``<output-dir>``. See docs/launching.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import submitit

from dinov2.run.submitit_job import ENTRY_POINTS, MULTI_PROCESS_ENTRY_POINTS, EntryPointJob
from dinov2.utils.entry_point import add_debug_flag, entry_point, start_entry_point
from dinov2.utils.errors import UsageError

logger = logging.getLogger(__name__)

LOG_SUBFOLDER = "submitit"


def get_args_parser() -> argparse.ArgumentParser:
    """The submission command line (the part before ``--``)."""
    p = argparse.ArgumentParser(prog="python -m dinov2.run.submit", description=__doc__.split("\n\n")[0],
                                epilog="Arguments after -- go to the entry point.")
    p.add_argument("entry_point", choices=sorted(ENTRY_POINTS))
    p.add_argument("--output-dir", required=True,
                   help="the run folder (on a file system every node sees); passed to the entry point")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1,
                   help="one task per GPU; 0 runs one CPU task per node")
    p.add_argument("--partition", help="SLURM partition (required unless --local)")
    p.add_argument("--timeout", type=int, default=60, help="wall time in minutes, after which the job requeues")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per task (data loading workers + 1)")
    p.add_argument("--job-name", default=None, help="default: dinov2-<entry point>")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the sbatch script and exit")
    mode.add_argument("--local", action="store_true", help="run through submitit's local executor and wait")
    slurm = p.add_argument_group("SLURM options")
    slurm.add_argument("--slurm-account")
    slurm.add_argument("--slurm-qos")
    slurm.add_argument("--slurm-constraint")
    slurm.add_argument("--slurm-exclude", help="nodes to avoid")
    slurm.add_argument("--slurm-comment")
    slurm.add_argument("--slurm-mem", help="memory per node, e.g. 256G")
    slurm.add_argument("--slurm-signal-delay-s", type=int, default=120,
                       help="seconds between the requeue signal (USR2) and the end of the time slot")
    slurm.add_argument("--slurm-max-requeues", type=int, default=10,
                       help="how many times a job that ran out of time requeues itself (preemptions: always)")
    slurm.add_argument("--slurm-setup", action="append", default=[],
                       help="a shell line run before srun (repeatable), e.g. 'module load cuda'")
    slurm.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option (repeatable), e.g. --slurm-param mail-type=END")
    add_debug_flag(p)
    return p


def split_command_line(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``[submit args] -- [entry point args]`` -> both lists (the second empty without ``--``)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def tasks_per_node(gpus_per_node: int) -> int:
    """One task per GPU; a CPU-only node runs one task."""
    return max(1, gpus_per_node)


def _parse_params(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--slurm-param {item!r}: expected KEY=VALUE, e.g. --slurm-param mail-type=END.")
        out[key.strip()] = value
    return out


def slurm_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """sbatch parameters in submitit's ``SlurmExecutor`` names (also what the dry run prints).

    Raises:
        UsageError: (a ``ValueError``) impossible resources or a missing partition.
    """
    if args.partition is None:
        raise UsageError("--partition is required to submit to SLURM (or use --local to run here).")
    extra = _parse_params(args.slurm_param)
    if args.slurm_mem is not None:
        extra["mem"] = args.slurm_mem
    params: dict[str, Any] = {
        "job_name": args.job_name or f"dinov2-{args.entry_point}",
        "partition": args.partition,
        "time": args.timeout,
        "nodes": args.nodes,
        "ntasks_per_node": tasks_per_node(args.gpus_per_node),
        "signal_delay_s": args.slurm_signal_delay_s,
        # SLURM's default lets the other tasks run on (stuck in a collective) when one fails.
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    optional = {"gpus_per_node": args.gpus_per_node or None, "cpus_per_task": args.cpus_per_task,
                "account": args.slurm_account, "qos": args.slurm_qos, "constraint": args.slurm_constraint,
                "exclude": args.slurm_exclude, "comment": args.slurm_comment,
                "setup": list(args.slurm_setup) or None, "additional_parameters": extra or None}
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def sbatch_script(folder: Path, params: dict[str, Any]) -> str:
    """The sbatch script ``SlurmExecutor`` would submit with ``params``, built without SLURM installed.

    submitit builds the script in ``submitit.slurm.slurm._make_sbatch_string`` (private in 1.5.4)
    and ``SlurmExecutor`` refuses to exist where ``srun`` is missing, so the dry run calls that
    function directly, with the command line ``SlurmExecutor`` uses; this is the only place that
    touches submitit's internals.
    """
    from submitit.slurm.slurm import _make_sbatch_string  # noqa: PLC0415 (private: see the docstring)

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **params)


def _validate(args: argparse.Namespace, entry_argv: Sequence[str]) -> None:
    if args.nodes < 1 or args.gpus_per_node < 0 or args.timeout < 1:
        raise UsageError(f"Need --nodes >= 1, --gpus-per-node >= 0 and --timeout >= 1 minute; got {args.nodes}, "
                         f"{args.gpus_per_node}, {args.timeout}.")
    if any(a == "--output-dir" or a.startswith("--output-dir=") for a in entry_argv):
        raise UsageError("Give --output-dir once, before '--': python -m dinov2.run.submit passes it to the "
                         "entry point.")
    n_tasks = args.nodes * tasks_per_node(args.gpus_per_node)
    if n_tasks > 1 and args.entry_point not in MULTI_PROCESS_ENTRY_POINTS:
        raise UsageError(f"{args.entry_point} runs as one process; use --nodes 1 --gpus-per-node 1 (or 0 for CPU), "
                         f"not {n_tasks} tasks.")
    if args.local and args.nodes != 1:
        raise UsageError("--local runs on this machine: use --nodes 1.")


def local_log_folder(output_dir: Path) -> Path:
    """A new folder for a ``--local`` job's logs, made before the job starts.

    submitit's local controller opens its task logs in ``<folder>/<job id>/`` as soon as it
    starts, while the submitting process creates that folder only after starting it (the job id
    is the controller's process id): under load the controller can get there first and fail with
    ``FileNotFoundError``. A folder without ``%j``, named here and created first, leaves no window.

    Args:
        output_dir: the run folder.

    Returns:
        ``<output_dir>/submitit/local-<YYYYmmdd-HHMMSS>-<pid of this process>``, existing.
    """
    folder = output_dir / LOG_SUBFOLDER / f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Submit (or dry-run, or run locally) one entry point; returns the process exit code (1 with
    one ``ERROR:`` line for inconsistent options, a :class:`~dinov2.utils.errors.UsageError` that
    names the flag; with ``--debug`` that error is raised instead).

    Raises:
        submitit.core.utils.FailedJobError: with ``--local``, the job failed (its log is quoted).
    """
    own, entry_argv = split_command_line(sys.argv[1:] if argv is None else argv)
    args = get_args_parser().parse_args(own)
    start_entry_point(tune_allocator=False)
    _validate(args, entry_argv)
    output_dir = Path(args.output_dir).resolve()
    job = EntryPointJob(args.entry_point, [*entry_argv, "--output-dir", str(output_dir)])
    folder = output_dir / LOG_SUBFOLDER / "%j"

    if args.local:
        executor = submitit.LocalExecutor(folder=local_log_folder(output_dir), max_num_timeout=args.slurm_max_requeues)
        executor.update_parameters(timeout_min=args.timeout, nodes=1, gpus_per_node=args.gpus_per_node,
                                   tasks_per_node=tasks_per_node(args.gpus_per_node),
                                   signal_delay_s=args.slurm_signal_delay_s)
        submitted = executor.submit(job)
        print(f"Running {job} locally as job {submitted.job_id}; logs in {submitted.paths.folder}", flush=True)
        submitted.results()  # waits for every task; raises FailedJobError with the log of a failed one
        print(f"Job {submitted.job_id} finished", flush=True)
        return 0

    params = slurm_parameters(args)
    if args.dry_run:
        print(sbatch_script(folder, params))
        # The job itself travels as a pickle, so the script does not show it; say what it would run.
        print(f"# dry run: would submit {job}", file=sys.stderr)
        return 0
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=args.slurm_max_requeues)
    executor.update_parameters(**params)
    submitted = executor.submit(job)
    print(f"Submitted {job} as SLURM job {submitted.job_id}; logs in {submitted.paths.folder}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
