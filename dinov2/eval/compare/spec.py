"""What the command line names: backbones, tasks, data folders and the flags passed to each task.

Every parser here raises :class:`~dinov2.utils.errors.UsageError` (or ``FileNotFoundError``) with a
message that names the value at fault, so the command stops with one ``ERROR:`` line before any
run starts.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dinov2.eval.presets import load_preset
from dinov2.models.build import is_random_init
from dinov2.utils.errors import UsageError

KINDS = ("seg", "probe")
# A backbone name becomes a folder name and a table row: keep it portable.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# Flags and config keys the comparison sets for every run; a task argument may not set them.
RESERVED = {
    "--pretrained-weights": "pretrained_weights", "--output-dir": "output_dir", "--seed": "seed",
    "--dataset-name": "dataset.name", "--base-data-dir": "dataset.base_data_dir",
    "--dataset-percent": "dataset.percent", "--dataset-seed": "dataset.seed",
    "--segmentation-head": "model.head", "--arch": "model.arch",
}


@dataclass(frozen=True)
class Backbone:
    """One backbone of the comparison: ``weights`` is a checkpoint path, or ``none`` (random init)."""

    name: str
    weights: str

    @property
    def random(self) -> bool:
        """Whether this backbone is a random initialisation (no file)."""
        return is_random_init(self.weights)


@dataclass(frozen=True)
class Task:
    """One evaluation: ``seg`` (segmentation finetuning) or ``probe`` (linear probe) on a preset."""

    kind: str
    preset: str
    head: str | None = None

    @property
    def label(self) -> str:
        """As typed on the command line, e.g. ``seg:brain_tissue:UNETR``."""
        return ":".join(p for p in (self.kind, self.preset_name, self.head) if p)

    @property
    def preset_name(self) -> str:
        """The preset's name (a YAML path's file stem)."""
        path = Path(self.preset)
        return path.stem if path.suffix in (".yaml", ".yml") else self.preset

    @property
    def folder(self) -> str:
        """The task's folder under ``runs/`` (colons are not portable in file names)."""
        return self.label.replace(":", "-")


def parse_backbone(text: str) -> Backbone:
    """``NAME=PATH``, ``PATH`` (named after the file), ``random`` or ``NAME=none`` / ``NAME=random``.

    Raises:
        UsageError: an empty or non-portable name.
        FileNotFoundError: a checkpoint path that does not exist.
    """
    name, sep, weights = text.partition("=")
    if not sep:
        name, weights = (text, "none") if _random_word(text) else (Path(text).stem, text)
    weights = "none" if _random_word(weights) else weights
    if not _NAME.match(name):
        raise UsageError(f"--backbones {text}: the name '{name}' must be letters, digits, '_', '.', '+' or '-' "
                         "(it names a folder and a table row); write NAME=PATH.")
    if weights == "none":
        return Backbone(name, weights)
    if not Path(weights).is_file():
        raise FileNotFoundError(f"--backbones {text}: checkpoint not found: {weights}")
    # Absolute, so a run's config names the same file from any working directory.
    return Backbone(name, str(Path(weights).resolve()))


def _random_word(text: str) -> bool:
    return text.strip().lower() in ("random", "none")


def parse_backbones(texts: Sequence[str]) -> list[Backbone]:
    """Every ``--backbones`` value; names must differ.

    Raises:
        UsageError: two backbones with one name.
    """
    backbones = [parse_backbone(t) for t in texts]
    names = [b.name for b in backbones]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"--backbones: the name(s) {', '.join(twice)} are given twice; name them NAME=PATH.")
    return backbones


def parse_task(text: str) -> Task:
    """``seg:<preset>[:<head>]`` or ``probe:<preset>``; the preset must exist and fit the kind.

    Raises:
        UsageError: an unknown kind, a head on a probe, an unknown head, or a preset of the other kind.
        FileNotFoundError: an unknown preset (the message lists the packaged ones).
    """
    parts = text.split(":")
    if parts[0] not in KINDS or len(parts) < 2 or not parts[1]:
        raise UsageError(f"--tasks {text}: write seg:<preset>[:<head>] or probe:<preset> (e.g. seg:brain_tissue:UNETR, "
                         "probe:brain_lobes).")
    kind, preset = parts[0], parts[1]
    head = ":".join(parts[2:]) or None
    if kind == "probe" and head:
        raise UsageError(f"--tasks {text}: a linear probe has no head; write probe:{preset}.")
    if head:
        head = _canonical_head(head, text)
    _check_preset_kind(kind, preset, text)
    return Task(kind, preset, head)


def _canonical_head(head: str, text: str) -> str:
    from dinov2.eval.segmentation.model import canonical_head_name  # noqa: PLC0415 - heavy import, on use only

    try:
        return canonical_head_name(head)
    except ValueError as exc:
        raise UsageError(f"--tasks {text}: {exc}") from None


def _check_preset_kind(kind: str, preset: str, text: str) -> None:
    """A classification preset is for ``probe``, any other for ``seg``."""
    try:
        task = load_preset(preset).get("task") or "segmentation"
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--tasks {text}: {exc}") from None
    if (task == "classification") != (kind == "probe"):
        other = "probe" if kind == "seg" else "seg"
        raise UsageError(f"--tasks {text}: '{preset}' is a {task} preset; write {other}:{preset}.")


def parse_tasks(texts: Sequence[str]) -> list[Task]:
    """Every ``--tasks`` value, each once.

    Raises:
        UsageError: a task given twice.
    """
    tasks = [parse_task(t) for t in texts]
    labels = [t.label for t in tasks]
    if len(set(labels)) != len(labels):
        raise UsageError(f"--tasks: a task is given twice ({', '.join(labels)}).")
    return tasks


def parse_data_dirs(texts: Sequence[str], tasks: Sequence[Task]) -> dict[str, Path]:
    """``--data-dir [PRESET=]DIR ...`` -> ``{task label: folder}``; a bare DIR serves every other task.

    Raises:
        UsageError: a task without a folder, or a PRESET that no task uses.
    """
    default, named = None, {}
    for text in texts:
        preset, sep, folder = text.partition("=")
        if sep:
            named[preset] = Path(folder)
        else:
            default = Path(text)
    used = {t.preset for t in tasks} | {t.preset_name for t in tasks}
    unknown = sorted(set(named) - used)
    if unknown:
        raise UsageError(f"--data-dir {unknown[0]}=...: no task uses the preset '{unknown[0]}'.")
    dirs = {}
    for task in tasks:
        folder = named.get(task.preset, named.get(task.preset_name, default))
        if folder is None:
            raise UsageError(f"--tasks {task.label}: no data folder; pass --data-dir {task.preset_name}=DIR "
                             "(the folder holding the preset's datalist) or one --data-dir DIR for every task.")
        dirs[task.label] = folder.resolve()
    return dirs


def check_datalists(tasks: Sequence[Task], data_dirs: dict[str, Path]) -> None:
    """Every task's datalist exists, so a comparison does not fail after hours of other runs.

    Raises:
        FileNotFoundError: a missing datalist; the message gives the preset's sample command if it has one.
    """
    for task in tasks:
        preset = load_preset(task.preset)
        datalist = Path(str(preset.get("datalist") or ""))
        path = datalist if datalist.is_absolute() else data_dirs[task.label] / datalist
        if not path.is_file():
            sample = preset.get("sample_command")
            hint = f" Create it with: {sample.replace('<base_data_dir>', str(data_dirs[task.label]))}" if sample else ""
            raise FileNotFoundError(f"--tasks {task.label}: datalist not found: {path}.{hint}")


def parse_task_args(texts: Sequence[str]) -> dict[str, list[str]]:
    """``--task-args KIND:ARGS ...`` -> ``{kind: [arg, ...]}`` (``all:`` goes to both kinds).

    ARGS is split like a shell line, so ``"seg:--epochs 2"`` and ``seg:--epochs=2`` are the same.

    Raises:
        UsageError: an unknown KIND, or an argument the comparison sets itself (:data:`RESERVED`).
    """
    out: dict[str, list[str]] = {kind: [] for kind in KINDS}
    for text in texts:
        kind, sep, rest = text.partition(":")
        if not sep or kind not in (*KINDS, "all"):
            raise UsageError(f"--task-args {text}: start with seg:, probe: or all: (e.g. seg:--epochs=2).")
        args = shlex.split(rest)
        _check_not_reserved(args, text)
        for target in (KINDS if kind == "all" else (kind,)):
            out[target] += args
    return out


def _check_not_reserved(args: Sequence[str], text: str) -> None:
    for arg in args:
        flag = arg.split("=", 1)[0].strip()  # --seed=3, --seed (its value follows) or the key of seed=3
        if flag in RESERVED or flag in RESERVED.values():
            raise UsageError(f"--task-args {text}: the comparison sets {flag} itself for every run "
                             "(see --backbones, --tasks, --fractions, --seeds, --data-dir, --arch).")


def parse_seeds(texts: Sequence[str]) -> dict[str, list[int]]:
    """``--seeds N [KIND:N ...]`` -> ``{kind: [0, ..., N-1]}``: N seeds per task, KIND:N for one kind.

    ``--seeds 3 seg:1`` runs 3 seeds of every probe and 1 of every segmentation (the costly one).

    Raises:
        UsageError: a count below 1, an unknown KIND, or text that is not a count.
    """
    counts = {kind: 3 for kind in KINDS}
    # A bare count first, so KIND:N wins wherever it is written.
    for text in sorted(texts, key=lambda t: ":" in t):
        kind, sep, number = text.rpartition(":")
        if (sep and kind not in KINDS) or not number.isdigit() or int(number) < 1:
            raise UsageError(f"--seeds {text}: write a count >= 1 (every task) or KIND:count with KIND seg or probe.")
        for target in ((kind,) if sep else KINDS):
            counts[target] = int(number)
    return {kind: list(range(n)) for kind, n in counts.items()}
