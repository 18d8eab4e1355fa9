"""Summary numbers of the evidence, and its three renderings: a plain table, markdown, JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .tasks import TaskData

JSON_NAME = "evidence.json"
MARKDOWN_NAME = "evidence.md"
TASK_TITLES = {
    "patch": "patch: {input_mm:g} mm cube ({input_voxels}^3 voxels) -> lobe at its centre",
    "dense": "dense: token -> majority lobe of its cube",
}
# What the probe reads from a network, per task; {blocks} is filled in by representation().
REPRESENTATIONS = {"patch": "CLS + mean patch token", "dense": "patch token"}


def representation(task_name: str, blocks: int) -> str:
    """``"CLS + mean patch token, last block"``, ``"patch token, last 4 blocks concatenated"``, ..."""
    where = "last block" if blocks == 1 else f"last {blocks} blocks concatenated"
    return f"{REPRESENTATIONS.get(task_name, 'features')}, {where}"


def task_title(name: str, task: dict) -> str:
    """One row's title, filled in from its evidence.json entry (the patch cube's size, the blocks read)."""
    base = task.get("task", name)
    try:
        title = TASK_TITLES.get(base, base).format(**task.get("description", {}))
    except (KeyError, IndexError):  # an older evidence.json without the fields: the bare name
        return name
    return f"{title} [{task['representation']}]" if "representation" in task else title


def seed_statistics(values: list[float]) -> dict:
    """Mean, standard deviation (n-1; 0 for one value), min and max over seeds; None fields if empty."""
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {"n": len(values), "mean": mean, "std": math.sqrt(var), "min": min(values), "max": max(values)}


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def summarise_task(task: TaskData, result: dict, blocks: int = 1) -> dict:
    """One row's numbers (a task read from the last ``blocks`` blocks): per-seed values, statistics, margins, chance.

    Args:
        task: the task (for its description and test labels).
        result: ``{"teacher": [per teacher], "random_init": [per seed], "raw": {...}}``, each
            holding ``test_balanced_accuracy``.
        blocks: how many of the networks' last blocks the probes read.

    Returns:
        The row's section of evidence.json.
    """
    teacher = seed_statistics([r["test_balanced_accuracy"] for r in result["teacher"]])
    random_init = seed_statistics([r["test_balanced_accuracy"] for r in result["random_init"]])
    raw = result["raw"]
    present = int(torch.unique(task.splits["test"].labels).numel())
    return {
        "task": task.name,
        "blocks": blocks,
        "representation": representation(task.name, blocks),
        "description": task.info,
        "chance": 1.0 / present,
        "teacher": {**teacher, "per_seed": result["teacher"]},
        "random_init": {**random_init, "per_seed": result["random_init"]},
        "raw": raw,
        "margins": {"teacher_minus_random": _difference(teacher["mean"], random_init["mean"]),
                    "teacher_minus_raw": _difference(teacher["mean"], raw["test_balanced_accuracy"])},
    }


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _warning_lines(evidence: dict) -> list[str]:
    lines = []
    for check in evidence["pretraining_overlap"]:
        if check["held_out_in_datalist"]:
            lines.append(f"WARNING: {check['teacher']} was pretrained on {', '.join(check['held_out_in_datalist'])} "
                         f"(listed in {check['datalist']}): the evaluation data was seen in pretraining, so this "
                         "result is not evidence. Pretrain without dinov2.eval.evidence.held_out_files().")
        elif not check["checked"]:
            lines.append(f"NOTE: {check['teacher']}: {check['note']}.")
    return lines


def _folds(evidence: dict) -> str:
    """How the penalty was chosen, for the headers (after "the right hemisphere")."""
    k = evidence.get("cv_folds", "?")
    # evidence.json written before the blocks existed has no cv_grouping: its folds were z slabs.
    if evidence.get("cv_grouping", "z-slabs") == "z-slabs":
        how = f"{k}-fold cross-validation over z slabs of it"
    else:
        how = f"{k}-fold cross-validation over {evidence['cv_block_mm']:g} mm blocks of it"
    buffered = ", each fold fitted without the inputs that share voxels with it" if evidence.get("cv_buffer") else ""
    return how + buffered


def format_table(evidence: dict) -> str:
    """Plain-text table of every task and representation (what the command prints)."""
    rows = [("task", "representation", "n", "mean", "std", "min", "max")]
    for name, task in evidence["tasks"].items():
        raw = task["raw"]
        for label, stats in (("teacher", task["teacher"]), ("random init", task["random_init"])):
            rows.append((name, label, str(stats["n"]), *(_number(stats[k]) for k in ("mean", "std", "min", "max"))))
        rows.append((name, f"raw intensities ({raw['pooling']}^3)", "1", _number(raw["test_balanced_accuracy"]),
                     "", "", ""))
        rows.append((name, "teacher - random", "", _number(task["margins"]["teacher_minus_random"], True), "", "", ""))
        rows.append((name, "teacher - raw", "", _number(task["margins"]["teacher_minus_raw"], True), "", "", ""))
        rows.append((name, "chance", "", _number(task["chance"]), "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    body = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    head = [f"Test balanced accuracy on the left hemisphere (probes trained on all of the right hemisphere, "
            f"L2 chosen by {_folds(evidence)}); n = seeds, std over seeds."]
    patch_rows = [name for name, task in evidence["tasks"].items() if task.get("task", name) == "patch"]
    if patch_rows:
        cube = TASK_TITLES["patch"].format(**evidence["tasks"][patch_rows[0]]["description"])
        head.append(f"patch_size {evidence.get('patch_size')}: {cube}; voxels of the other hemisphere, where "
                    "reached, are air.")
    head += [f"{name}: {task['representation']}" for name, task in evidence["tasks"].items() if "representation" in task]
    return "\n".join(head + _warning_lines(evidence) + body)


def _cell(stats: dict) -> str:
    if not stats["n"]:
        return "-"
    if stats["n"] == 1:
        return _number(stats["mean"])
    return f"{stats['mean']:.3f} ± {stats['std']:.3f} ({stats['min']:.3f}–{stats['max']:.3f})"


def format_markdown(evidence: dict) -> str:
    """A markdown table (one row per task) ready to paste into the docs."""
    n_teachers = len(evidence["teachers"])
    lines = [f"| task | teacher (n={n_teachers}) | random init (n={len(evidence['random_seeds'])}) | "
             "raw intensities | teacher − random | teacher − raw | chance |",
             "|---|---|---|---|---|---|---|"]
    for name, task in evidence["tasks"].items():
        raw = task["raw"]
        lines.append(f"| {task_title(name, task)} | {_cell(task['teacher'])} | {_cell(task['random_init'])} | "
                     f"{_number(raw['test_balanced_accuracy'])} (pool {raw['pooling']}³) | "
                     f"{_number(task['margins']['teacher_minus_random'], True)} | "
                     f"{_number(task['margins']['teacher_minus_raw'], True)} | {_number(task['chance'])} |")
    lines += ["", "Balanced accuracy on the left hemisphere of the FSL MNI152 templates (linear probes trained on "
              f"all of the right hemisphere, penalty chosen by {_folds(evidence)}, as is the raw baseline's "
              "pooling); mean ± std (min–max) over seeds. "
              f"Patch task: patch_size {evidence.get('patch_size')}, the {evidence.get('patch_size')}^3-voxel cube "
              "centred on each classification_sample site, voxels of the other hemisphere (where reached) "
              "set to air. "
              "Made by `python -m dinov2.eval.evidence`."]
    warnings = _warning_lines(evidence)
    return "\n".join(lines + ([""] + warnings if warnings else [])) + "\n"


def write_outputs(evidence: dict, output_dir: Path) -> dict[str, str]:
    """Write evidence.json and evidence.md into ``output_dir`` (created); returns their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = output_dir / JSON_NAME, output_dir / MARKDOWN_NAME
    json_path.write_text(json.dumps(evidence, indent=2) + "\n", encoding="utf-8")
    markdown_path.write_text(format_markdown(evidence), encoding="utf-8")
    return {"json": str(json_path), "markdown": str(markdown_path)}
