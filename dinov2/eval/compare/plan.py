"""The plan of a comparison: backbones x tasks x label fractions x seeds, one run folder each.

Run folders: ``<output-dir>/runs/<task>/<backbone>/f<fraction>_s<seed>/`` (``<task>`` is the task
spec with ``-`` for ``:``, e.g. ``seg-brain_tissue-UNETR``). Every run of a fraction trains on the
same nested subset of the training cases (``--dataset-seed`` fixed to the plan's subset seed), so
seeds and backbones differ only in what they are meant to: initialisation, data order,
augmentation and the backbone itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from dinov2.utils.errors import UsageError

from .spec import Backbone, Task


@dataclass(frozen=True)
class PlanSettings:
    """Everything a plan is built from (what the command line gave, parsed)."""

    backbones: Sequence[Backbone]
    tasks: Sequence[Task]
    fractions: Sequence[float]
    seeds: dict[str, Sequence[int]]  # by task kind
    output_dir: Path
    data_dirs: dict[str, Path]
    task_args: dict[str, list[str]] = field(default_factory=dict)
    random_overrides: Sequence[str] = ()
    subset_seed: int = 0


@dataclass(frozen=True)
class Run:
    """One evaluation run: a backbone on a task at a label fraction and a seed."""

    task: Task
    backbone: Backbone
    fraction: float
    seed: int
    out_dir: Path
    argv: tuple[str, ...]

    @property
    def label(self) -> str:
        """``seg:brain_tissue ours 25% seed 1``: how progress lines name the run."""
        return f"{self.task.label} {self.backbone.name} {self.fraction:g}% seed {self.seed}"


def run_folder(output_dir: Path, task: Task, backbone: Backbone, fraction: float, seed: int) -> Path:
    """``<output_dir>/runs/<task folder>/<backbone>/f<fraction>_s<seed>``."""
    return Path(output_dir) / "runs" / task.folder / backbone.name / f"f{fraction:g}_s{seed}"


def run_argv(settings: PlanSettings, task: Task, backbone: Backbone, fraction: float, seed: int,
             out_dir: Path) -> tuple[str, ...]:
    """The entry point's command line of one run: key=value overrides first, then flags.

    The probe's parser reads key=value overrides only as one block before the flags (a flag that
    takes several values would swallow them otherwise); segmentation reads them anywhere.
    """
    extra = list(settings.task_args.get(task.kind, []))
    overrides = [a for a in extra if _is_override(a)]
    flags = [a for a in extra if not _is_override(a)]
    if backbone.random:
        overrides = [*settings.random_overrides, *overrides]
    ours = ["--pretrained-weights", backbone.weights, "--output-dir", str(out_dir),
            "--dataset-name", task.preset, "--base-data-dir", str(settings.data_dirs[task.label]),
            "--dataset-percent", f"{fraction:g}", "--dataset-seed", str(settings.subset_seed), "--seed", str(seed)]
    if task.head:
        ours += ["--segmentation-head", task.head]
    return tuple(overrides + ours + flags)


def _is_override(arg: str) -> bool:
    """``key=value`` (a config override), not a flag or a flag's value."""
    return not arg.startswith("-") and "=" in arg


def build_plan(settings: PlanSettings) -> list[Run]:
    """Every run, in the order they run: task, fraction, seed, then backbone.

    Backbones vary fastest so a comparison stopped early still has every backbone at the first
    seeds.

    Returns:
        The runs; per task ``fractions x seeds x backbones``.
    """
    runs = []
    for task in settings.tasks:
        for fraction in settings.fractions:
            for seed in settings.seeds[task.kind]:
                for backbone in settings.backbones:
                    out_dir = run_folder(settings.output_dir, task, backbone, fraction, seed)
                    argv = run_argv(settings, task, backbone, fraction, seed, out_dir)
                    runs.append(Run(task, backbone, float(fraction), int(seed), out_dir, argv))
    return runs


def random_init_overrides(backbones: Sequence[Backbone], arch: str | None, arch_kwargs: Sequence[str]) -> list[str]:
    """The key=value overrides that build a random-init backbone (``random``).

    Its architecture is ``--arch`` with ``--arch-kwargs``; without ``--arch``, that of the first
    checkpoint among the backbones (read from its embedded config), so "random" is the same
    network as the pretrained one, without the pretraining.

    Raises:
        UsageError: a random backbone whose architecture is unknown (no ``--arch``, and no
            checkpoint with an embedded config), or a ``--arch-kwargs`` item that is not key=value.
    """
    if not any(b.random for b in backbones):
        return []
    bad = [kv for kv in arch_kwargs if "=" not in kv]
    if bad:
        raise UsageError(f"--arch-kwargs {bad[0]}: write key=value (e.g. patch_size=8).")
    if arch:
        return [f"model.arch={arch}", *(f"model.backbone_kwargs.{kv}" for kv in arch_kwargs)]
    files = [b for b in backbones if not b.random]
    if not files:
        raise UsageError("--backbones has only random-init backbones: pass --arch (a registry name, e.g. "
                         "vit_large_3d) and --arch-kwargs for their architecture.")
    return checkpoint_architecture(files[0]) + [f"model.backbone_kwargs.{kv}" for kv in arch_kwargs]


def checkpoint_architecture(backbone: Backbone) -> list[str]:
    """``model.arch=...`` and ``model.backbone_kwargs.<key>=...`` of a checkpoint's embedded config.

    The input size is left out: each task sets it (crop or probe input).

    Raises:
        UsageError: the file has no embedded config (e.g. the published 3DINO-ViT weights).
    """
    from dinov2.checkpoints.layouts import read_checkpoint  # noqa: PLC0415 - reads tensors: on use only
    from dinov2.models.build import backbone_kwargs_from_config  # noqa: PLC0415

    config = read_checkpoint(backbone.weights).config
    if not config:
        raise UsageError(f"--backbones {backbone.name}={backbone.weights} does not record its architecture, so the "
                         "random-init backbone cannot copy it: pass --arch (e.g. vit_large_3d for the published "
                         "3DINO-ViT) and --arch-kwargs.")
    arch, kwargs = backbone_kwargs_from_config(config, backbone.weights)
    kwargs.pop("img_size", None)
    return [f"model.arch={arch}", *(f"model.backbone_kwargs.{k}={_override_text(v)}" for k, v in kwargs.items())]


def _override_text(value) -> str:
    """A value as a key=value override reads it back (YAML scalars)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_text(v) for v in value) + "]"
    return str(value)
