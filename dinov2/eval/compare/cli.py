"""The command line of ``python -m dinov2.eval.compare`` (see the package docstring)."""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path
from typing import Sequence

from dinov2.utils.entry_point import add_debug_flag, entry_point, start_entry_point
from dinov2.utils.errors import UsageError

from . import __doc__ as PACKAGE_DOC
from . import entries, spec
from .plan import PlanSettings, Run, build_plan, random_init_overrides
from .plots import write_plots
from .report import write_reports
from .runner import FINISHED, run_all, run_status
from .stats import N_RESAMPLES
from .table import aggregate

logger = logging.getLogger("dinov2.eval.compare")


def get_args_parser() -> argparse.ArgumentParser:
    """The flags; the package docstring is the ``--help`` epilog."""
    p = argparse.ArgumentParser(prog="python -m dinov2.eval.compare", description=PACKAGE_DOC.split("\n\n")[0],
                                epilog=PACKAGE_DOC.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", required=True, metavar="SPEC",
                   help="NAME=PATH (a teacher checkpoint, ours or the published 3DINO-ViT), PATH, "
                        "or random / NAME=none")
    p.add_argument("--tasks", nargs="+", required=True, metavar="TASK", help="seg:<preset>[:<head>] or probe:<preset>")
    p.add_argument("--output-dir", required=True, help="comparison.md/.csv, plots/ and runs/ go here")
    p.add_argument("--data-dir", nargs="+", default=[], metavar="[PRESET=]DIR",
                   help="folder holding a preset's datalist; a bare DIR serves every task without its own")
    p.add_argument("--fractions", nargs="+", type=float, default=[100.0], metavar="PERCENT",
                   help="label fractions, %% of the training set (nested subsets; default 100)")
    p.add_argument("--seeds", nargs="+", default=["3"], metavar="N|KIND:N",
                   help="seeds per task (0..N-1; default 3); KIND:N for one kind, e.g. --seeds 3 seg:1")
    p.add_argument("--reference", default=None, help="backbone the others are compared with, case by case "
                   "(default: the first of --backbones)")
    p.add_argument("--task-args", nargs="+", default=[], metavar="KIND:ARGS",
                   help="arguments for every run of a kind (seg, probe or all), e.g. seg:--epochs=2 "
                        "'seg:--eval-iters 20' probe:optim.epochs=5")
    p.add_argument("--arch", default=None, help="architecture of a random backbone (registry name); default: that "
                   "of the first checkpoint among --backbones")
    p.add_argument("--arch-kwargs", nargs="+", default=[], metavar="KEY=VALUE",
                   help="constructor overrides of the random backbone, e.g. patch_size=8")
    p.add_argument("--subset-seed", type=int, default=0, help="which training cases each fraction keeps (every run "
                   "of a fraction uses the same subset)")
    p.add_argument("--bootstrap", type=int, default=N_RESAMPLES, help="bootstrap resamples of the paired differences")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resampling")
    p.add_argument("--isolate", action="store_true", help="each run as a child process (python -m ...) instead of "
                   "in this process: its memory is returned when it ends")
    p.add_argument("--dry-run", action="store_true", help="print the plan (each run's state and command) and stop")
    add_debug_flag(p)
    return p


def _check_numbers(args: argparse.Namespace) -> None:
    bad = [f for f in args.fractions if not 0 < f <= 100]
    if bad:
        raise UsageError(f"--fractions {bad[0]:g}: a label fraction is a percentage in (0, 100].")
    if args.bootstrap < 1:
        raise UsageError(f"--bootstrap {args.bootstrap}: at least 1 resample.")


def settings_from_args(args: argparse.Namespace) -> tuple[PlanSettings, str]:
    """Parse and check every flag (files, presets, specs) before anything runs.

    Returns:
        ``(plan settings, reference backbone name)``.

    Raises:
        UsageError, FileNotFoundError: the first value at fault, named.
    """
    _check_numbers(args)
    backbones = spec.parse_backbones(args.backbones)
    tasks = spec.parse_tasks(args.tasks)
    reference = args.reference or backbones[0].name
    if reference not in {b.name for b in backbones}:
        raise UsageError(f"--reference {reference}: not one of --backbones ({', '.join(b.name for b in backbones)}).")
    data_dirs = spec.parse_data_dirs(args.data_dir, tasks)
    spec.check_datalists(tasks, data_dirs)
    settings = PlanSettings(
        backbones=backbones, tasks=tasks, fractions=list(dict.fromkeys(args.fractions)),
        seeds=spec.parse_seeds(args.seeds), output_dir=Path(args.output_dir).resolve(), data_dirs=data_dirs,
        task_args=spec.parse_task_args(args.task_args), subset_seed=args.subset_seed,
        random_overrides=random_init_overrides(backbones, args.arch, args.arch_kwargs))
    return settings, reference


def resolve_configs(runs: Sequence[Run]) -> dict[Path, dict]:
    """Every run's config, resolved by its entry point (a bad task argument fails here, before any run)."""
    return {run.out_dir: entries.resolved_config(run.task.kind, run.argv, run.task.label) for run in runs}


def print_plan(runs: Sequence[Run], configs: dict[Path, dict]) -> None:
    """``--dry-run``: each run's state and the command that runs it."""
    for index, run in enumerate(runs, start=1):
        print(f"[{index}/{len(runs)}] {run.label}: {run_status(run, configs[run.out_dir])}")
        print("    python " + " ".join(shlex.quote(a) for a in entries.command(run.task.kind, run.argv)[1:]))


def report(runs: Sequence[Run], reference: str, args: argparse.Namespace, failed: Sequence[Run]) -> str:
    """Write the tables and plots of the finished runs; returns the Markdown table."""
    output_dir = Path(args.output_dir)
    groups = aggregate(runs, reference, args.bootstrap, args.bootstrap_seed)
    missing = [r.label for r in failed]
    md_path, csv_path, text = write_reports(groups, output_dir, reference, args.bootstrap, missing)
    pngs = write_plots(groups, output_dir)
    logger.info("Wrote %s, %s%s", md_path, csv_path, f" and {len(pngs)} PNG in {output_dir / 'plots'}" if pngs else "")
    return text


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; returns 0, or 1 when a run failed (its table is written anyway) or for a user error."""
    args = get_args_parser().parse_args(argv)
    start_entry_point()
    settings, reference = settings_from_args(args)
    runs = build_plan(settings)
    configs = resolve_configs(runs)
    if args.dry_run:
        print_plan(runs, configs)
        return 0
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    done = sum(run_status(r, configs[r.out_dir]) == FINISHED for r in runs)
    logger.info("Comparison: %d runs (%d finished before) in %s", len(runs), done, settings.output_dir / "runs")
    outcome = run_all(runs, configs, isolate=args.isolate)
    print(report(runs, reference, args, [r for r, _ in outcome.failed]), flush=True)
    if outcome.failed:
        logger.error("%d of %d runs failed: %s. Run the same command again to retry them.", len(outcome.failed),
                     len(runs), "; ".join(r.label for r, _ in outcome.failed))
        return 1
    return 0
