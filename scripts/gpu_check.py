"""The prepared accelerator check: one table of what a GPU does with the 3DINO ViT-L recipe.

Run it through ``bash scripts/gpu_check.sh [options]`` (which sets the environment and a global
``timeout``) or directly::

    python scripts/gpu_check.py                      # on one GPU: < 8 minutes on an H100/H200
    python scripts/gpu_check.py --out results/       # also results/gpu_check.{md,json,log}
    python scripts/gpu_check.py --cpu-smoke          # every stage at toy sizes on the CPU

Stages, each in its own process with its own time budget (a stage that fails, runs out of
memory or of time gives rows saying so; the table is always printed):

1. ``tests``: ``pytest -m cuda tests/cuda`` (SDPA fused kernels vs math, bf16 autocast losses vs
   fp32, FSDP on one GPU, checkpoint resume on the GPU), one row per test;
2. ``peak``: the bf16 matmul peak of this GPU, measured now (MFU is quoted against it);
3. ``step``: training iterations of the packaged recipe (ViT-L/16, 2 x 96³ + 8 x 48³ crops,
   65,536-prototype heads, bf16 autocast) on a synthetic batch already on the GPU, at batch
   32 / 64 / 128, eager and under ``torch.compile``: it/s, samples/s, MFU, peak memory;
4. ``loop``: the real training loop (loader workers, augmentation, step) on synthetic volumes
   with ``crops.augment_on_device`` off and on;
5. ``loader``: the data loader's samples/s with 4 / 8 / 16 workers.

Stage logic (budgets, rows, the table) lives here; what a stage measures lives in
``scripts/gpu_check_stages.py``. Exit code 0 when no row failed or timed out, else 1 (after
the table).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dinov2.utils.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
STAGES_SCRIPT = REPO / "scripts" / "gpu_check_stages.py"
STAGES = ("tests", "peak", "step", "loop", "loader")
INJECTIONS = ("error", "hang", "oom")

# Seconds per stage on one H100/H200, summing to under the 8-minute target with the start-up
# of each process (~5 s). Estimates until the check has run on a GPU; the step stage holds
# torch.compile's compilations of ViT-L, whose length is the least known.
GPU_BUDGETS = {"tests": 70, "peak": 20, "step": 200, "loop": 110, "loader": 55}
GPU_TOTAL_S = 460
SMOKE_BUDGETS = {"tests": 60, "peak": 30, "step": 60, "loop": 60, "loader": 40}
SMOKE_TOTAL_S = 240
# A stage given less than this is not started (its process alone takes seconds to start).
MIN_STAGE_S = 3.0
# The target for the ViT-L recipe on a GPU, bf16 (#15).
TARGET_MFU = 0.40
COLUMNS = ("stage", "case", "status", "it/s", "samples/s", "MFU", "peak mem GiB", "detail")


@dataclass(frozen=True)
class Stage:
    """A stage to run: its name, time budget and the cases it must report (empty: discovered)."""

    name: str
    budget_s: float
    cases: tuple[dict, ...]


# ------------------------------------------------------------------------------ settings
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got '{text}'") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected a comma list of non-negative integers, got '{text}'")
    return values


def _assignment(choices: Sequence[str] | None):
    """argparse type of ``NAME=VALUE``: NAME a stage, VALUE one of ``choices`` (None: seconds).

    With ``choices`` (``--inject``) the tests stage is not a NAME: it is pytest itself, nothing
    of this script runs there to inject into.
    """
    stages = [s for s in STAGES if choices is None or s != "tests"]

    def parse(text: str) -> tuple[str, str]:
        name, sep, value = text.partition("=")
        valid = value in choices if choices is not None else value.replace(".", "", 1).isdigit()
        if not sep or name not in stages or not valid:
            allowed = "|".join(choices) if choices else "SECONDS"
            raise argparse.ArgumentTypeError(
                f"expected STAGE={allowed} with STAGE in {', '.join(stages)}, got '{text}'")
        return name, value

    return parse


def get_parser() -> argparse.ArgumentParser:
    """The command line (``--help``)."""
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run every stage at toy sizes on the CPU (tiny model, few steps, small budgets): proves the "
                        "plumbing, not the speed")
    p.add_argument("--out", type=Path, default=None, help="also write gpu_check.md, gpu_check.json, gpu_check.log here")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list from {', '.join(STAGES)} (default: all)")
    p.add_argument("--total-seconds", type=float, default=None,
                   help=f"budget of the whole check (default {GPU_TOTAL_S}; {SMOKE_TOTAL_S} with --cpu-smoke); a "
                        "stage gets the smaller of its own budget and what is left")
    p.add_argument("--stage-budget", type=_assignment(None), action="append", default=[], metavar="STAGE=SECONDS",
                   help="change one stage's budget (repeatable)")
    p.add_argument("--batch-sizes", type=_int_list, default=None, help="step stage batches (default 32,64,128)")
    p.add_argument("--steps", type=int, default=None, help="timed iterations per step case (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first iterations per step case (default 2)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor)")
    p.add_argument("--loop-batch", type=int, default=None, help="loop stage batch (default 64)")
    p.add_argument("--workers", type=_int_list, default=None, help="loader stage worker counts (default 4,8,16)")
    p.add_argument("--inject", type=_assignment(INJECTIONS), action="append", default=[],
                   metavar="STAGE=error|hang|oom",
                   help="for testing the check itself: make a stage (not tests) fail, hang, or (step) run out of "
                        "memory at its largest batch")
    return p


def build_spec(args: argparse.Namespace, work_dir: Path) -> dict:
    """Everything the stage processes need, as JSON-able values; GPU sizes, or toy sizes with ``--cpu-smoke``.

    Raises:
        UsageError: a size option out of range.
    """
    smoke = args.cpu_smoke

    def given(value, smoke_default, gpu_default):
        return value if value is not None else (smoke_default if smoke else gpu_default)

    spec = {
        "smoke": smoke,
        "device": "cpu" if smoke else "cuda",
        # The packaged recipe (ViT-L) on the GPU; the tests' tiny config (vit_tiny_3d, 32³ crops) for the smoke.
        "config_file": str(REPO / "configs" / "tiny_cpu.yaml") if smoke else None,
        "overrides": ["train.datalist=unused.json"],
        "threads": 1 if smoke else None,
        "peak_dtype": "fp32" if smoke else "bf16",  # the compute dtype of the config run
        "peak_size": 256 if smoke else 8192,
        "peak_repeats": 3 if smoke else 20,
        "steps": given(args.steps, 1, 5),
        "warmup": given(args.warmup, 1, 2),
        "compile_backend": given(args.compile_backend, "eager", "inductor"),
        "loop_batch": given(args.loop_batch, 2, 64),
        "loop_warmup": 1 if smoke else 3,
        "loop_iterations": 1 if smoke else 8,
        "loop_workers": 0 if smoke else None,  # None: the recipe's train.num_workers
        "loader_seconds": 0.5 if smoke else 8.0,
        "loader_batch": 2 if smoke else 16,
        "volume_count": 2 if smoke else 4,
        "volume_shape": [40, 44, 36] if smoke else [182, 218, 182],
        "inject": dict(args.inject),
        "work_dir": str(work_dir),
    }
    batches = given(args.batch_sizes, [2, 4], [32, 64, 128])
    workers = given(args.workers, [1], [4, 8, 16])
    if spec["steps"] < 1 or spec["warmup"] < 1 or spec["loop_batch"] < 2 or min(batches) < 2:
        raise UsageError("gpu_check.py: --steps and --warmup must be >= 1, --loop-batch and every --batch-sizes "
                         "value >= 2 (KoLeo needs two samples per process).")
    spec["cases"] = {
        "tests": [],
        "peak": [{"case": f"{spec['peak_dtype']} matmul {spec['peak_size']}²"}],
        "step": [{"case": f"batch {b}, {'compile' if c else 'eager'}", "batch": b, "compile": c}
                 for c in (False, True) for b in batches],
        "loop": [{"case": f"batch {spec['loop_batch']}, augment_on_device={str(a).lower()}", "augment_on_device": a}
                 for a in (False, True)],
        "loader": [{"case": f"{w} worker{'' if w == 1 else 's'}", "workers": w} for w in workers],
    }
    return spec


def plan_stages(args: argparse.Namespace, spec: dict) -> list[Stage]:
    """The stages of ``--stages``, in :data:`STAGES` order, with their budgets and cases."""
    names = [n.strip() for n in args.stages.split(",") if n.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown or not names:
        raise UsageError(f"gpu_check.py --stages: unknown {unknown}; choose from {', '.join(STAGES)}.")
    budgets = {**(SMOKE_BUDGETS if args.cpu_smoke else GPU_BUDGETS)}
    for name, seconds in args.stage_budget:
        budgets[name] = float(seconds)
    return [Stage(n, float(budgets[n]), tuple(spec["cases"][n])) for n in STAGES if n in names]


# ------------------------------------------------------------------------------ running
@dataclass(frozen=True)
class Outcome:
    """How a stage's process ended."""

    returncode: int | None  # None: killed at its budget
    seconds: float
    log_tail: str  # the last non-empty line of its output

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def _command(stage: Stage, spec_path: Path, rows_path: Path) -> list[str]:
    if stage.name == "tests":
        # -v: a line per finished test in the log, read back if pytest is killed before its report
        return [sys.executable, "-m", "pytest", "-m", "cuda", "tests/cuda", "-v", "-p", "no:cacheprovider",
                "--junitxml", str(rows_path.with_suffix(".xml"))]
    return [sys.executable, str(STAGES_SCRIPT), stage.name, str(spec_path), str(rows_path)]


def run_process(command: list[str], timeout: float, log_path: Path) -> Outcome:
    """Run ``command`` in its own process group; kill the whole group (loader workers, compile
    workers) at ``timeout``."""
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        code: int | None = None
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:  # also when the check itself is stopped (gpu_check.sh's timeout): no stage outlives it
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log_path.read_text(encoding="utf-8", errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return Outcome(code, time.perf_counter() - start, lines[-1][:300] if lines else "")


def _missing_row(stage: str, case: str, outcome: Outcome) -> dict:
    if outcome.timed_out:
        status = f"timeout after {outcome.seconds:.0f} s"
    elif outcome.returncode:
        status = f"failed: {outcome.log_tail or f'exit code {outcome.returncode}'}"
    else:
        status = "failed: the stage ended without this row"
    return {"stage": stage, "case": case, "status": status}


_VERBOSE_RESULT = re.compile(r"^tests/cuda/(\w+)\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR)\b")


def logged_test_rows(log_path: Path, outcome: Outcome) -> list[dict]:
    """Rows of the tests pytest finished before it was stopped (its ``-v`` lines), and one for the rest."""
    rows = []
    if log_path.is_file():
        for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            found = _VERBOSE_RESULT.match(line.strip())
            if found:
                module, name, result = found.groups()
                status = {"PASSED": "passed", "SKIPPED": "skipped"}.get(result, "failed (see gpu_check.log)")
                rows.append({"stage": "tests", "case": f"{module}::{name}", "status": status})
    return rows + [_missing_row("tests", "pytest -m cuda tests/cuda (the rest)", outcome)]


def junit_rows(junit_path: Path, outcome: Outcome) -> list[dict]:
    """One row per test of pytest's JUnit XML report; without a report, what its log says."""
    if not junit_path.is_file():
        return logged_test_rows(junit_path.with_suffix(".log"), outcome)
    rows = []
    for case in ET.parse(junit_path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        status = "passed"
        for kind, label in (("failure", "failed"), ("error", "failed"), ("skipped", "skipped")):
            found = case.find(kind)
            if found is not None:
                status = f"{label}: {(found.get('message') or kind).splitlines()[0][:200]}"
                break
        rows.append({"stage": "tests", "case": name, "status": status})
    return rows or [{"stage": "tests", "case": "pytest -m cuda tests/cuda", "status": "failed: no test collected"}]


def stage_rows(stage: Stage, rows_path: Path, outcome: Outcome) -> list[dict]:
    """One row per case of the stage (what it wrote, or why it did not), then any row it wrote beyond them."""
    if stage.name == "tests":
        return junit_rows(rows_path.with_suffix(".xml"), outcome)
    written = []
    if rows_path.is_file():
        written = [json.loads(line) for line in rows_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_case = {row["case"]: row for row in written}
    expected = [by_case.get(c["case"]) or _missing_row(stage.name, c["case"], outcome) for c in stage.cases]
    # In the order the driver listed the cases, whatever order the stage measured them in.
    return expected + [row for row in written if row["case"] not in {c["case"] for c in stage.cases}]


def skipped_rows(stage: Stage, reason: str) -> list[dict]:
    """A row per case of a stage that was not started (the ``tests`` stage: one row)."""
    cases = [c["case"] for c in stage.cases] or ["pytest -m cuda tests/cuda"]
    return [{"stage": stage.name, "case": case, "status": f"skipped: {reason}"} for case in cases]


def run_stages(stages: list[Stage], spec: dict, work_dir: Path, total_s: float) -> tuple[list[dict], dict]:
    """Run every stage within its budget and the total; returns the rows and ``{stage: (seconds, budget)}``."""
    spec_path = work_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    deadline = time.perf_counter() + total_s
    rows, seconds = [], {}
    for stage in stages:
        timeout = min(stage.budget_s, deadline - time.perf_counter())
        if timeout < MIN_STAGE_S:
            rows += skipped_rows(stage, f"time budget spent ({total_s:.0f} s in all)")
            seconds[stage.name] = (0.0, stage.budget_s)
            continue
        print(f"gpu_check: {stage.name} (up to {timeout:.0f} s) ...", file=sys.stderr, flush=True)
        rows_path = work_dir / f"{stage.name}.jsonl"
        outcome = run_process(_command(stage, spec_path, rows_path), timeout, work_dir / f"{stage.name}.log")
        rows += stage_rows(stage, rows_path, outcome)
        seconds[stage.name] = (outcome.seconds, stage.budget_s)
    return rows, seconds


# ------------------------------------------------------------------------------ table
def add_mfu(rows: list[dict]) -> float | None:
    """Set ``mfu`` on every row with a rate and a FLOP count, against the measured peak; returns the peak (GFLOP/s)."""
    peaks = [r["peak_gflops"] for r in rows if r.get("status") == "ok" and r.get("peak_gflops")]
    peak = peaks[0] if peaks else None
    for row in rows:
        if peak and row.get("it_per_s") and row.get("flops_per_it"):
            row["mfu"] = row["flops_per_it"] * row["it_per_s"] / 1e9 / peak
    return peak


def _cell(value, fmt: str = "{}") -> str:
    if value is None:
        return ""
    return (fmt.format(value) if isinstance(value, (int, float)) else str(value)).replace("|", "\\|").replace("\n", " ")


def format_table(rows: list[dict]) -> str:
    """The check's one Markdown table (columns :data:`COLUMNS`)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        cells = [_cell(r["stage"]), _cell(r["case"]), _cell(r["status"]), _cell(r.get("it_per_s"), "{:.3g}"),
                 _cell(r.get("samples_per_s"), "{:.1f}"), _cell(r.get("mfu"), "{:.1%}"),
                 _cell(r.get("peak_mem_gib"), "{:.1f}"), _cell(r.get("detail"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mfu_verdict(rows: list[dict]) -> str:
    """The best MFU of the step stage against the issue's target (:data:`TARGET_MFU`)."""
    measured = [r for r in rows if r["stage"] == "step" and r.get("mfu") is not None]
    if not measured:
        return f"Target MFU >= {TARGET_MFU:.0%}: not measured."
    best = max(measured, key=lambda r: r["mfu"])
    verdict = "met" if best["mfu"] >= TARGET_MFU else "not met"
    return f"Target MFU >= {TARGET_MFU:.0%}: {verdict} (best {best['mfu']:.1%}, {best['case']})."


def format_report(rows: list[dict], seconds: dict, spec: dict, total_s: float, elapsed: float) -> str:
    """Title, machine, the table, the MFU verdict and the seconds each stage took."""
    machine = next((r["machine"] for r in rows if r.get("machine")), None)
    head = "machine: " + (", ".join(f"{k}={v}" for k, v in machine.items()) if machine else "not measured")
    mode = "CPU smoke (toy sizes: plumbing, not speed)" if spec["smoke"] else "GPU"
    budget = "; ".join(f"{name} {used:.0f} s of {budget:.0f}" for name, (used, budget) in seconds.items())
    return (f"# GPU check ({mode})\n\n{head}\n\n{format_table(rows)}\n\n{mfu_verdict(rows)} "
            f"Stage seconds: {budget}. Total {elapsed:.0f} s of a {total_s:.0f} s budget.\n")


def failed(rows: list[dict]) -> bool:
    """Whether any row failed or timed out (out of memory and skipped rows are results)."""
    return any(r["status"].startswith(("failed", "timeout")) for r in rows)


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise UsageError("gpu_check.py: torch sees no CUDA device here. Run it on a GPU machine, or add --cpu-smoke "
                         "to check the script's plumbing on this CPU.")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check, print the report; returns the exit code (1 when a row failed or timed out)."""
    from dinov2.utils.entry_point import run_entry_point

    return run_entry_point(_main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    # SIGTERM (gpu_check.sh's timeout) unwinds like an exception, so the running stage is killed too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if not args.cpu_smoke:
        _require_cuda()
    total_s = args.total_seconds
    if total_s is None:
        total_s = SMOKE_TOTAL_S if args.cpu_smoke else GPU_TOTAL_S
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        spec = build_spec(args, work)
        rows, seconds = run_stages(plan_stages(args, spec), spec, work, total_s)
        logs = "".join(f"===== {name}\n{(work / f'{name}.log').read_text(errors='replace')}\n"
                       for name in seconds if (work / f"{name}.log").is_file())
    peak = add_mfu(rows)
    report = format_report(rows, seconds, spec, total_s, time.perf_counter() - start)
    print(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.md").write_text(report)
        (args.out / "gpu_check.log").write_text(logs)
        summary = {"rows": rows, "peak_gflops": peak, "stage_seconds": seconds, "total_budget_s": total_s,
                   "settings": {k: v for k, v in spec.items() if k not in ("cases", "work_dir")}}
        (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    return 1 if failed(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
