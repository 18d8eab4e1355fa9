"""``run_evidence``: every representation on every task, then the summary (what the command runs)."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from dinov2.utils.device import resolve_device

from .backbones import Teacher, load_teacher, random_backbone, same_architecture
from .baselines import POOLING_GRIDS, raw_features
from .dense_task import build_dense_task
from .errors import EvidenceError
from .features import last_blocks, network_features, usable_blocks
from .folds import DEFAULT_BLOCK_MM, DEFAULT_BUFFER, DEFAULT_FOLDS, DEFAULT_GROUPING
from .held_out import EVALUATION_FILES, held_out_files, pretraining_overlap
from .patch_task import PATCH_PARAMS, build_patch_task
from .probe import balanced_accuracy, cross_validate, fit_probe
from .report import JSON_NAME, MARKDOWN_NAME, summarise_task, write_outputs
from .tasks import NUM_CLASSES, SPLITS, TaskData
from .volumes import load_evidence_volumes

logger = logging.getLogger("dinov2.eval.evidence")

DEFAULT_DENSE_WINDOW = 32
DEFAULT_BATCH_SIZE = 64
DEFAULT_PATCH_SIZE = PATCH_PARAMS.patch_size
# The last block alone, and the last four concatenated as DINOv2's linear evaluation reads a ViT.
DEFAULT_BLOCKS = (1, 4)


def row_name(task: str, blocks: int) -> str:
    """evidence.json key of a task read from the last ``blocks`` blocks: ``patch``, ``patch_last4``, ..."""
    return task if blocks == 1 else f"{task}_last{blocks}"


def probe_scores(features: dict[str, torch.Tensor], task: TaskData, cv: dict | None = None) -> dict:
    """Choose the probe's penalty by CV on training, refit it on all of training, score it on test.

    Args:
        features: split name -> ``(T, D)`` features of the split's labelled items.
        task: the task (for its labels and folds).
        cv: :func:`~.probe.cross_validate` of ``features["training"]`` if already run.

    Returns:
        ``{"test_balanced_accuracy", "l2", "cv_balanced_accuracy", "cv_by_l2", "cv_by_l2_per_fold",
        "training_examples", "test_examples"}``.
    """
    train, test = task.splits["training"], task.splits["test"]
    cv = cv or cross_validate(features["training"], train.labels, task.folds, NUM_CLASSES, fitted_on=task.fitted_on)
    probe = fit_probe(features["training"], train.labels, NUM_CLASSES, cv["l2"])
    return {"test_balanced_accuracy": balanced_accuracy(probe.predict(features["test"]), test.labels), **cv,
            "training_examples": int(train.labels.numel()), "test_examples": int(test.labels.numel())}


def network_scores(model: nn.Module, task: TaskData, batch_size: int, device: torch.device,
                   blocks: Sequence[int] = (1,)) -> dict[int, dict]:
    """:func:`probe_scores` of a frozen backbone's features read from the last ``n`` blocks, for each ``n``.

    The features of the most blocks are computed once (model moved to ``device`` and back); each
    ``n`` is capped at the backbone's depth.

    Returns:
        ``{n: probe_scores}`` for every distinct capped ``n``, ascending.
    """
    wanted = sorted({usable_blocks(model, n) for n in blocks})
    model.to(device)
    try:
        features = {s: network_features(model, task.splits[s], batch_size, device, wanted[-1]) for s in SPLITS}
    finally:
        model.cpu()
    return {n: probe_scores({s: last_blocks(f, wanted[-1], n) for s, f in features.items()}, task) for n in wanted}


def raw_scores(task: TaskData, patch: Sequence[int]) -> dict:
    """The raw-intensity baseline with the pooling grid chosen by the same CV (ties: the coarser grid).

    Returns:
        :func:`probe_scores` of the chosen grid plus ``pooling`` (g), ``features`` (g^3) and
        ``cv_by_pooling`` (g -> CV balanced accuracy at that grid's chosen penalty).
    """
    # Pool what the network is fed: the token's cube (dense) or the whole N^3 input cube (patch).
    side = min(patch) if task.name == "dense" else int(task.splits["training"].inputs.shape[-1])
    labels = task.splits["training"].labels
    tried = {}
    for grid in (g for g in POOLING_GRIDS if g <= side):
        training = raw_features(task.splits["training"], grid, patch)
        tried[grid] = cross_validate(training, labels, task.folds, NUM_CLASSES, fitted_on=task.fitted_on)
    best = max(tried, key=lambda g: (tried[g]["cv_balanced_accuracy"], -g))
    features = {s: raw_features(task.splits[s], best, patch) for s in SPLITS}
    return {**probe_scores(features, task, tried[best]), "pooling": best, "features": best ** 3,
            "cv_by_pooling": {str(g): r["cv_balanced_accuracy"] for g, r in tried.items()}}


def _check_patch_size(teacher: Teacher, patch_size: int, step: int) -> None:
    """Refuse a patch-task cube that is not a multiple of the token cube or is smaller than the sites' patches."""
    least = PATCH_PARAMS.patch_size
    if patch_size >= least and patch_size % step == 0:
        return
    suggestion = step * math.ceil(max(patch_size, least) / step)
    raise EvidenceError(f"--patch-size {patch_size} must be a multiple of the backbone's patch size {step} "
                        f"({teacher.path}) and at least the classification_sample patch size {least}: "
                        f"pass e.g. --patch-size {suggestion}.")


def check_sizes(teacher: Teacher, dense_window: int, patch_size: int = DEFAULT_PATCH_SIZE) -> tuple[int, int, int]:
    """The backbone's patch size, after checking that the patch-task cubes and the dense windows fit it.

    Args:
        teacher: the first teacher (all share one architecture).
        dense_window: dense-task window side in voxels.
        patch_size: patch-task cube side ``N`` in voxels.

    Returns:
        The backbone's token cube ``(ph, pw, pd)``.

    Raises:
        EvidenceError: ``patch_size`` or ``dense_window`` is not a multiple of the patch size,
            or ``patch_size`` is below the classification_sample patch size.
    """
    patch = tuple(int(p) for p in teacher.model.patch_embed.patch_size)
    step = math.lcm(*patch)
    _check_patch_size(teacher, patch_size, step)
    if dense_window < step or dense_window % step:
        suggestion = max(step, round(DEFAULT_DENSE_WINDOW / step) * step)
        raise EvidenceError(f"--dense-window {dense_window} is not a multiple of the backbone's patch size "
                            f"{list(patch)} ({teacher.path}): pass a multiple of {step}, "
                            f"e.g. --dense-window {suggestion}.")
    return patch  # type: ignore[return-value]


def _check_overlap(teachers: list[Teacher]) -> list[dict]:
    held_out = held_out_files()
    checks = []
    for teacher in teachers:
        check = {"teacher": str(teacher.path), **pretraining_overlap(teacher.config, held_out)}
        if check["held_out_in_datalist"]:
            logger.warning("%s: the evaluation data was in its pretraining datalist %s (%s): the result is NOT "
                           "evidence.", teacher.path, check["datalist"], ", ".join(check["held_out_in_datalist"]))
        elif not check["checked"]:
            logger.warning("%s: %s.", teacher.path, check["note"])
        checks.append(check)
    return checks


def _score_backbone(model: nn.Module, label: str, tasks: list[TaskData], blocks: Sequence[int], batch_size: int,
                    device: torch.device) -> dict[str, dict]:
    """Row name (:func:`row_name`) -> :func:`network_scores` of one backbone, each logged as it comes."""
    scores = {}
    for task in tasks:
        for n, found in network_scores(model, task, batch_size, device, blocks).items():
            scores[row_name(task.name, n)] = found
            logger.info("%s task, last %d block(s), %s: test balanced accuracy %.3f (CV %.3f, l2 %g)", task.name, n,
                        label, found["test_balanced_accuracy"], found["cv_balanced_accuracy"], found["l2"])
    return scores


def _evaluate_all(teachers: list[Teacher], spec: dict, seeds: range, tasks: list[TaskData], blocks: Sequence[int],
                  patch: Sequence[int], batch_size: int, device: torch.device) -> dict:
    """Row name -> ``{"teacher": [...], "random_init": [...], "raw": {...}}`` (see :func:`summarise_task`).

    The raw baseline does not depend on the blocks: every row of a task shares its task's.
    """
    results: dict[str, dict] = {}

    def add(key: str, scores: dict[str, dict], extra: dict) -> None:
        for row, found in scores.items():
            results.setdefault(row, {"teacher": [], "random_init": []})[key].append({**extra, **found})

    for i, teacher in enumerate(teachers):
        label = f"teacher {i + 1}/{len(teachers)} ({teacher.path})"
        add("teacher", _score_backbone(teacher.model, label, tasks, blocks, batch_size, device),
            {"checkpoint": str(teacher.path)})
    for seed in seeds:
        model = random_backbone(spec, seed)
        add("random_init", _score_backbone(model, f"random init seed {seed}", tasks, blocks, batch_size, device),
            {"seed": seed})
    for task in tasks:
        raw = raw_scores(task, patch)
        logger.info("%s task, raw intensities pooled to %d^3: test balanced accuracy %.3f (CV %.3f, l2 %g)",
                    task.name, raw["pooling"], raw["test_balanced_accuracy"], raw["cv_balanced_accuracy"], raw["l2"])
        for n in blocks:
            results[row_name(task.name, n)]["raw"] = raw
    return results


def run_evidence(teachers: Sequence[str | os.PathLike], random_seeds: int = 3,
                 output_dir: str | os.PathLike | None = None, device: str = "cpu",
                 dense_window: int = DEFAULT_DENSE_WINDOW, batch_size: int = DEFAULT_BATCH_SIZE,
                 patch_size: int = DEFAULT_PATCH_SIZE, cv_folds: int = DEFAULT_FOLDS,
                 blocks: Sequence[int] = DEFAULT_BLOCKS, cv_grouping: str = DEFAULT_GROUPING,
                 cv_block_mm: float = DEFAULT_BLOCK_MM, cv_buffer: bool = DEFAULT_BUFFER) -> dict:
    """Measure whether pretrained teachers' frozen features beat random inits and raw intensities.

    Args:
        teachers: teacher checkpoints (several = several pretraining seeds; one architecture).
        random_seeds: random-init backbones of that architecture (seeds 0 .. n-1).
        output_dir: where evidence.json / evidence.md go (default ``<first teacher's folder>/evidence``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:<i>`` (:func:`~dinov2.utils.device.resolve_device`);
            features are computed there in float32.
        dense_window: window side of the dense task in voxels (a multiple of the patch size).
        batch_size: patches per forward pass (dense windows: a quarter of it).
        patch_size: side ``N`` of the patch task's input cubes, centred on classification_sample's
            sites (16 = its own patches); a multiple of the backbone's patch size, at least 16.
            Larger cubes add context, never the other hemisphere (see :mod:`.patch_task`).
        cv_folds: folds of the training hemisphere in the cross-validation that chooses every
            probe's penalty and the raw baseline's pooling (see :mod:`.folds`).
        blocks: read each network's features from its last ``n`` blocks, one row per ``n`` (capped
            at the depth): ``patch``/``dense`` for 1, ``patch_last4``/``dense_last4`` for 4.
        cv_grouping: ``blocks`` (folds of cubic blocks dealt so that each holds every lobe) or
            ``z-slabs`` (the former folds, to reproduce earlier numbers).
        cv_block_mm: block side in mm (``blocks`` only).
        cv_buffer: fit each fold's probes without the items whose input shares a voxel with the
            held-out fold (off by default: see :mod:`.folds`).

    Returns:
        What evidence.json holds (``tasks.<patch|dense>`` with per-seed values, statistics,
        margins, chance; held-out files; the pretraining-datalist check; ``files``).

    Raises:
        EvidenceError: a bad file or option (the message names the fix).
        SampleDataError: the sample-data packages are not installed.
    """
    started = time.perf_counter()
    if not teachers:
        raise EvidenceError("No teacher checkpoint given: pass at least one --teacher teacher_checkpoint.pth.")
    if random_seeds < 0 or batch_size < 1 or cv_folds < 2:
        raise EvidenceError(f"--random-seeds must be >= 0, --batch-size >= 1 and --cv-folds >= 2, got {random_seeds}, "
                            f"{batch_size} and {cv_folds}.")
    if not blocks or min(blocks) < 1:
        raise EvidenceError(f"--last-blocks takes block counts >= 1 (e.g. --last-blocks 1 4), got {list(blocks)}.")
    device = resolve_device(device, key="--device")
    loaded = [load_teacher(p) for p in teachers]
    spec = same_architecture(loaded)
    patch = check_sizes(loaded[0], dense_window, patch_size)
    output_dir = Path(output_dir) if output_dir is not None else loaded[0].path.parent / "evidence"
    overlap = _check_overlap(loaded)
    logger.info("Building the evaluation tasks from the FSL MNI152 templates and the Harvard-Oxford atlas.")
    volumes = load_evidence_volumes()
    cv = {"folds": cv_folds, "grouping": cv_grouping, "block_mm": cv_block_mm, "buffer": cv_buffer}
    tasks = [build_patch_task(volumes, patch_size=patch_size, **cv),
             build_dense_task(volumes, dense_window, patch, **cv)]
    blocks = sorted({usable_blocks(loaded[0].model, n) for n in blocks})
    results = _evaluate_all(loaded, spec, range(random_seeds), tasks, blocks, patch, batch_size, device)
    evidence = {
        "teachers": [str(t.path) for t in loaded],
        "random_seeds": list(range(random_seeds)),
        "backbone": spec,
        "device": str(device),
        "patch_size": patch_size,
        "cv_folds": cv_folds,
        "cv_grouping": cv_grouping,
        "cv_block_mm": float(cv_block_mm) if cv_grouping == "blocks" else None,
        "cv_buffer": cv_buffer,
        "last_blocks": blocks,
        "evaluation_files": [str(p) for p in held_out_files(include_near_duplicates=False)],
        "evaluation_file_names": [f"{pkg}/{rel}" for pkg, rel in EVALUATION_FILES],
        "held_out_files": [str(p) for p in held_out_files()],
        "pretraining_overlap": overlap,
        "evaluation_data_in_pretraining": any(c["held_out_in_datalist"] for c in overlap),
        "tasks": {row_name(t.name, n): summarise_task(t, results[row_name(t.name, n)], n) for t in tasks for n in blocks},
    }
    evidence["seconds"] = round(time.perf_counter() - started, 1)
    evidence["files"] = {"json": str(output_dir / JSON_NAME), "markdown": str(output_dir / MARKDOWN_NAME)}
    write_outputs(evidence, output_dir)
    return evidence
