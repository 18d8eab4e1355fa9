"""Run a plan: reuse finished runs, redo killed or changed ones, one progress line per run.

Each run folder holds ``compare_run.json`` (the run's command line, its resolved config and
``state``: ``started`` or ``finished``). A run is *finished*, and reused, when its stamp says so,
its config equals the one this comparison resolves, and its ``results.json`` exists. A run with
the same config that did not finish (killed, failed, or its results.json deleted) runs again in
its folder; segmentation then continues from its ``last_checkpoint.pth``. A folder with another
config (changed task arguments or defaults) is emptied first, so nothing stale is mixed in.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from dinov2.train.metrics import format_eta

from . import entries
from .plan import Run

logger = logging.getLogger("dinov2.eval.compare")

STAMP_NAME, RESULTS_NAME = "compare_run.json", "results.json"
FINISHED, RESUME, NEW = "finished", "resume", "new"


@dataclass
class Outcome:
    """What :func:`run_all` did: runs reused, run now, and failed (with the exit code)."""

    reused: list[Run] = field(default_factory=list)
    ran: list[Run] = field(default_factory=list)
    failed: list[tuple[Run, int]] = field(default_factory=list)


def read_stamp(out_dir: Path) -> dict | None:
    """The run folder's ``compare_run.json``, or None (absent or unreadable)."""
    try:
        return json.loads((Path(out_dir) / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def write_stamp(run: Run, config: dict[str, Any], state: str, seconds: float | None = None) -> None:
    """Write ``compare_run.json`` through a temporary file (a kill never leaves half of it)."""
    stamp = {"state": state, "argv": list(run.argv), "config": config, "seconds": seconds}
    partial = run.out_dir / (STAMP_NAME + ".partial")
    partial.write_text(json.dumps(stamp, indent=1) + "\n")
    partial.replace(run.out_dir / STAMP_NAME)


def run_status(run: Run, config: dict[str, Any]) -> str:
    """``finished`` (reuse it), ``resume`` (same config, not finished) or ``new`` (run from an empty folder)."""
    stamp = read_stamp(run.out_dir)
    if stamp is None or stamp.get("config") != config:
        return NEW
    if stamp.get("state") == FINISHED and (run.out_dir / RESULTS_NAME).is_file():
        return FINISHED
    return RESUME


def execute(run: Run, isolate: bool) -> int:
    """Run one evaluation; returns the entry point's exit code."""
    if isolate:
        return entries.run_as_subprocess(run.task.kind, run.argv)
    return entries.run_in_process(run.task.kind, run.argv)


def _prepare(run: Run, config: dict[str, Any], status: str) -> None:
    """Empty a folder that holds another config's run, then stamp the run as started."""
    if status == NEW and run.out_dir.exists():
        shutil.rmtree(run.out_dir)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    write_stamp(run, config, "started")


class _Progress:
    """One line per run: position, what it is, and the ETA from the runs timed so far."""

    def __init__(self, total: int, to_run: int):
        self.total, self.left, self.seconds = total, to_run, []

    def line(self, index: int, run: Run, status: str) -> str:
        """``[3/12] <run>: running (10 to run, ETA 0:04:10)``, or ``...: finished before, reused (<folder>)``."""
        head = f"[{index}/{self.total}] {run.label}"
        if status == FINISHED:
            return f"{head}: finished before, reused ({run.out_dir})"
        eta = format_eta(sum(self.seconds) / len(self.seconds) * self.left) if self.seconds else "after this run"
        verb = "continuing" if status == RESUME else "running"
        return f"{head}: {verb} ({self.left} to run, ETA {eta})"

    def done(self, seconds: float) -> None:
        """Count a run that took ``seconds`` (its time feeds the ETA of the rest)."""
        self.seconds.append(seconds)
        self.left -= 1


def run_all(runs: Sequence[Run], configs: dict[Path, dict[str, Any]], isolate: bool = False) -> Outcome:
    """Run every unfinished run of the plan, in order; a failed run is reported and the rest go on.

    Args:
        runs: the plan (:func:`.plan.build_plan`).
        configs: each run's resolved config, by run folder (:func:`.entries.resolved_config`).
        isolate: each run in a child process (``python -m``) instead of this process.

    Returns:
        The :class:`Outcome`.
    """
    statuses = [run_status(run, configs[run.out_dir]) for run in runs]
    progress = _Progress(len(runs), sum(s != FINISHED for s in statuses))
    outcome = Outcome()
    for index, (run, status) in enumerate(zip(runs, statuses), start=1):
        logger.info(progress.line(index, run, status))
        if status == FINISHED:
            outcome.reused.append(run)
            continue
        _prepare(run, configs[run.out_dir], status)
        start = time.perf_counter()
        code = execute(run, isolate)
        seconds = time.perf_counter() - start
        progress.done(seconds)
        if code == 0 and (run.out_dir / RESULTS_NAME).is_file():
            write_stamp(run, configs[run.out_dir], FINISHED, round(seconds, 1))
            outcome.ran.append(run)
        else:
            logger.error("%s failed (exit code %d); its log is above. The comparison goes on; run it again to "
                         "retry this run.", run.label, code)
            outcome.failed.append((run, code))
    return outcome
