"""Pre-flight check: every input file a long job will read, read once before the job starts.

A datalist's headers say little about the voxels: a copy cut short, a volume of NaNs or a label
map of another dataset reads fine until the job reaches it, hours into a run. The pre-flight reads
each file the job will read in full (:func:`~dinov2.data.validation.read_volume`,
:func:`~dinov2.data.validation.read_label_map`) in a few threads (decompression releases the GIL),
and reports every problem at once, naming each file and what to do. With ``skip`` the entries
holding a bad file are left out instead, and ``skipped.tsv`` lists them.

Each result is cached by the file's size and modification time (in ``$DINOV2_CACHE_DIR``,
else ``$XDG_CACHE_HOME/dinov2``, else ``~/.cache/dinov2``): a second job on the same files
costs one ``stat`` per file. A changed file is read again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Hashable, Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from dinov2.data.datalist.format import SPLITS, DatalistError, Problem
from dinov2.data.datalist.load import load_finetune_datalist, load_pretrain_datalist, progress_bar
from dinov2.data.dicom_series import volume_source
from dinov2.data.skipped_report import REPORT_NAME as SKIPPED_REPORT, write_skipped_tsv
from dinov2.data.validation import InputVolumeError, read_label_map, read_volume, warn_nonfinite

logger = logging.getLogger("dinov2.data.preflight")

CACHE_VERSION = 1


@dataclass(frozen=True)
class FileCheck:
    """One file a job will read, and what the job needs of it.

    Attributes:
        entry: the datalist entry the file belongs to (e.g. ``3`` or ``("training", 3)``); a bad
            file removes its whole entry when skipping.
        where: the entry's place, for messages (``"[3]"``, ``"training[3].label"``).
        path: the file or DICOM folder (absolute).
        role: ``"image"`` or ``"label map"``.
        channels: image channels the model takes from this file (see ``read_volume``).
        any_frames: accept a 4D series of any length (pretraining picks frames itself).
        allowed: label maps: the stored values the task accepts.
        classes: label maps: the classes in words, for the message.
        grid_of: label maps: the image whose voxel grid they must share.
        fix: label maps: what to do about values outside the classes.
    """

    entry: Hashable
    where: str
    path: str
    role: str = "image"
    channels: int = 1
    any_frames: bool = False
    allowed: tuple[int, ...] | None = None
    classes: str = ""
    grid_of: str | None = None
    fix: str = ""

    def signature(self) -> dict:
        """What the result depends on besides the files' contents (not where the file is listed)."""
        out = asdict(self)
        out.pop("entry"), out.pop("where")
        return out


@dataclass
class PreflightResult:
    """What the pre-flight found.

    Attributes:
        problems: every problem, one per bad file, in the order of the checks.
        bad_entries: the entries holding at least one bad file.
        files: files checked; ``cached``: of which answered from the cache.
        seconds: wall time.
    """

    problems: list[Problem] = field(default_factory=list)
    bad_entries: set = field(default_factory=set)
    files: int = 0
    cached: int = 0
    seconds: float = 0.0


def default_cache_path() -> Path:
    """``$DINOV2_CACHE_DIR/preflight.json`` (else under ``$XDG_CACHE_HOME/dinov2`` or ``~/.cache/dinov2``)."""
    root = os.environ.get("DINOV2_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "dinov2")
    return Path(root) / "preflight.json"


def _file_state(path: str) -> list[int] | None:
    """(size, mtime_ns) of a file; for a DICOM folder the count, total size and newest mtime of
    its files; None when it does not exist (never cached)."""
    path = os.fspath(volume_source(path))  # FOLDER::SERIES: the folder's state
    try:
        if os.path.isdir(path):
            stats = [e.stat() for e in os.scandir(path) if e.is_file()]
            return [len(stats), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


class PreflightCache:
    """Results of earlier checks, keyed by what was checked and the files' size and mtime.

    One JSON file; concurrent jobs may each rewrite it (atomically): an update lost that way only
    means a file is read again next time.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_cache_path()
        self._entries: dict[str, dict] = {}
        self._dirty = False
        try:
            loaded = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict) and loaded.get("version") == CACHE_VERSION:
                self._entries = dict(loaded.get("results", {}))
        except (OSError, ValueError):
            pass  # no cache yet, or an unreadable one: start empty

    @staticmethod
    def key(check: FileCheck) -> str | None:
        """The cache key of ``check``; None when a file it depends on is missing."""
        states = [_file_state(check.path)] + ([_file_state(check.grid_of)] if check.grid_of else [])
        if any(s is None for s in states):
            return None
        payload = json.dumps([CACHE_VERSION, check.signature(), states], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()

    def get(self, key: str | None) -> dict | None:
        return self._entries.get(key) if key else None

    def put(self, key: str | None, record: dict) -> None:
        if key:
            self._entries[key] = record
            self._dirty = True

    def save(self) -> None:
        """Write the cache atomically; a cache that cannot be written is a debug note, never an error."""
        if not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps({"version": CACHE_VERSION, "results": self._entries}), encoding="utf-8")
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError as exc:
            logger.debug("Pre-flight cache %s not written: %s", self.path, exc)


def _read(check: FileCheck) -> dict:
    """Run one check; the record the cache keeps (``problem`` None when the file is good)."""
    record: dict[str, Any] = {"problem": None, "fix": "", "nonfinite": 0, "voxels": 0, "fill": None}
    try:
        if check.role == "label map":
            read_label_map(check.path, check.allowed or (), check.classes, image=check.grid_of,
                           **({"fix": check.fix} if check.fix else {}))
        else:
            volume = read_volume(check.path, channels=check.channels, any_frames=check.any_frames,
                                 frame_flag=None, role=check.role)
            shape = volume.shape if volume.frame is None else volume.spatial_shape
            record.update(nonfinite=volume.nonfinite, fill=volume.fill_value, voxels=math.prod(shape))
    except InputVolumeError as exc:
        record.update(problem=exc.problem, fix=exc.fix)
    return record



def run_preflight(checks: Sequence[FileCheck], *, cache: PreflightCache | None = None, workers: int | None = None,
                  progress: bool = True) -> PreflightResult:
    """Check every file of ``checks`` (cached ones from ``cache``), all problems collected.

    Args:
        checks: the files and what is needed of them.
        cache: earlier results (None: read every file).
        workers: reading threads; default min(8, CPUs, files).
        progress: a tqdm bar (files, rate, ETA).

    Returns:
        A :class:`PreflightResult`. Partial NaN/Inf voxels are logged once per file, from the
        cache too.
    """
    start = time.perf_counter()
    result = PreflightResult(files=len(checks))
    keys = [PreflightCache.key(c) if cache is not None else None for c in checks]
    records: list[dict | None] = [cache.get(k) if cache is not None else None for k in keys]
    todo = [i for i, r in enumerate(records) if r is None]
    result.cached = len(checks) - len(todo)
    if todo:
        workers = max(1, min(workers or min(8, os.cpu_count() or 1), len(todo)))
        with logging_redirect_tqdm(), ThreadPoolExecutor(workers) as pool:
            bar = progress_bar(pool.map(_read, [checks[i] for i in todo]), len(todo), "checking input files", progress)
            for i, record in zip(todo, bar):
                records[i] = record
                if cache is not None:
                    cache.put(keys[i], record)
    for check, record in zip(checks, records):
        if record["problem"] is not None:
            fix = record["fix"] or "fix the file or remove it from the datalist"
            result.problems.append(Problem(check.where, check.path, record["problem"], fix))
            result.bad_entries.add(check.entry)
        elif record["nonfinite"]:
            warn_nonfinite(check.path, record["nonfinite"], record["voxels"],
                           f"the smallest finite value ({record['fill']:g})")
    if cache is not None:
        cache.save()
    result.seconds = time.perf_counter() - start
    return result


def write_skipped(problems: Sequence[Problem], folder: str | os.PathLike) -> Path | None:
    """``<folder>/skipped.tsv``: one row per bad file (path, reason and hint, where in the datalist);
    ``None`` (nothing written) without problems."""
    rows = [(p.path, f"{p.reason}; {p.hint}", p.where) for p in problems]
    return write_skipped_tsv(Path(folder) / SKIPPED_REPORT, ("path", "reason", "where"), rows)


def enforce(result: PreflightResult, *, datalist: str | os.PathLike, entries: int, skip: bool,
            report_dir: str | os.PathLike | None, flag: str = "--skip-bad-inputs") -> set:
    """Fail on the problems found, or (``skip``) report them and return the entries to leave out.

    Args:
        result: what :func:`run_preflight` found.
        datalist: the datalist file, for the message.
        entries: how many entries the job has (to refuse skipping all of them).
        skip: leave bad entries out (``--skip-bad-inputs``) instead of failing.
        report_dir: where ``skipped.tsv`` goes when skipping.
        flag: the option that skips, named in the message.

    Returns:
        The bad entries (empty when every file is good).

    Raises:
        DatalistError: problems and not ``skip``, or every entry is bad.
    """
    if not result.problems:
        return set()
    files = f"{len(result.problems)} input file{'s' if len(result.problems) > 1 else ''}"
    if not skip or len(result.bad_entries) >= entries:
        advice = (f"fix or remove them, or pass {flag} to run on the others (listed in {SKIPPED_REPORT})"
                  if not skip else "no entry is left to run on")
        raise DatalistError(datalist, result.problems, summary=f"Datalist {datalist}: {files} cannot be used; {advice}:")
    report = write_skipped(result.problems, report_dir or ".")
    for problem in result.problems:
        logger.warning("Skipped %s %s: %s", problem.where, problem.path, problem.reason)
    logger.warning("%s skipped (%d of %d entries left out, %s); listed in %s", files, len(result.bad_entries),
                   entries, flag, report)
    return set(result.bad_entries)


def summary_line(result: PreflightResult) -> str:
    """One log line: files checked, from the cache, problems, time."""
    return (f"Pre-flight: {result.files} input files checked ({result.cached} unchanged since an earlier check), "
            f"{len(result.problems)} problem(s), {result.seconds:.1f} s")


def checked_pretrain_entries(datalist: str | os.PathLike, *, skip: bool = False,
                             report_dir: str | os.PathLike | None = None, read_voxels: bool = True,
                             cache: PreflightCache | None = None, progress: bool = True) -> list[dict]:
    """The pretraining datalist's entries after the pre-flight (headers, then every file in full).

    Args:
        datalist: the pretraining datalist JSON.
        skip: leave entries with a bad file out (``skipped.tsv`` in ``report_dir``) instead of failing.
        report_dir: the run folder.
        read_voxels: also read every file in full (False: headers only).
        cache: earlier results (None: read every file).
        progress: progress bars.

    Returns:
        The good entries, as :func:`~dinov2.data.datalist.load_pretrain_datalist` returns them.

    Raises:
        DatalistError: every problem at once (or, with ``skip``, when no entry is left).
    """
    header_problems: list[Problem] = []
    entries = load_pretrain_datalist(datalist, validate=True, progress=progress, collect=header_problems)
    bad_headers = {p.entry for p in header_problems}
    checks = [FileCheck(i, f"[{i}]", e["image"], any_frames=True)
              for i, e in enumerate(entries) if read_voxels and i not in bad_headers]
    result = run_preflight(checks, cache=cache, progress=progress)
    result.problems[:0] = header_problems
    result.bad_entries |= bad_headers
    if read_voxels:
        logger.info("%s", summary_line(result))
    bad = enforce(result, datalist=datalist, entries=len(entries), skip=skip, report_dir=report_dir)
    return [e for i, e in enumerate(entries) if i not in bad]


@dataclass(frozen=True)
class LabelRule:
    """What a task accepts in a label map (see :func:`~dinov2.data.validation.read_label_map`).

    Attributes:
        allowed: stored values that are classes of the task.
        classes: the classes in words.
        fix: what to do about other values.
    """

    allowed: tuple[int, ...]
    classes: str
    fix: str = ""


def _finetune_checks(data: dict, bad: set, channels: int | None, labels: LabelRule | None) -> list[FileCheck]:
    """The files of every good entry: each image (or modality file), and each label map under ``labels``."""
    checks = []
    for split in SPLITS:
        for i, entry in enumerate(data.get(split, [])):
            if (split, i) in bad:
                continue
            images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
            for k, image in enumerate(images):
                where = f"{split}[{i}].image" + (f"[{k}]" if len(images) > 1 else "")
                # several files = one channel each; one file gives every channel (a 4D series)
                per_file = 1 if len(images) > 1 else (channels or 1)
                checks.append(FileCheck((split, i), where, image, channels=per_file, any_frames=channels is None))
            if labels is not None and isinstance(entry.get("label"), str):
                checks.append(FileCheck((split, i), f"{split}[{i}].label", entry["label"], role="label map",
                                        allowed=tuple(sorted(labels.allowed)), classes=labels.classes,
                                        grid_of=images[0], fix=labels.fix))
    return checks


def _class_index_problems(data: dict, class_count: int) -> list[Problem]:
    """Entries of a classification datalist whose label is not a class index ``0..class_count-1``."""
    problems = []
    for split in SPLITS:
        for i, entry in enumerate(data.get(split, [])):
            label = entry.get("label")
            if label is None or (isinstance(label, int) and not isinstance(label, bool) and label < class_count):
                continue  # no label (test entries), or a class of the task (negative ones are found earlier)
            image = entry["image"][0] if isinstance(entry["image"], list) else entry["image"]
            if isinstance(label, int) and not isinstance(label, bool):
                reason = f"label {label} is not a class of this task (class indices 0..{class_count - 1})"
                hint = "correct the label, or set dataset.num_classes / dataset.classes to the task's classes"
            else:
                reason = f"label {label!r} is not a class index"
                hint = "a classification datalist gives each entry an integer class index as its label"
            problems.append(Problem(f"{split}[{i}].label", image, reason, hint, entry=(split, i)))
    return problems


def checked_finetune_datalist(datalist: str | os.PathLike, *, channels: int | None = 1,
                              labels: LabelRule | None = None, class_count: int | None = None, skip: bool = False,
                              report_dir: str | os.PathLike | None = None, read_voxels: bool = True,
                              cache: PreflightCache | None = None, progress: bool = True) -> dict[str, Any]:
    """A finetuning datalist after the pre-flight: headers and grids, then every image and label map in full.

    Args:
        datalist: the finetuning datalist JSON.
        channels: image channels of the model (a one-file entry must give them: a 3D volume for 1,
            a 4D series of that many frames otherwise); None accepts any number of frames.
        labels: the task's classes, checked in every label-map file; None: label values unchecked.
        class_count: classification: every label must be a class index below it (None: unchecked).
        skip: leave entries with a bad file out (``skipped.tsv`` in ``report_dir``) instead of failing.
        report_dir: the run folder.
        read_voxels: also read every file in full (False: headers and grids only).
        cache: earlier results (None: read every file).
        progress: progress bars.

    Returns:
        The datalist as :func:`~dinov2.data.datalist.load_finetune_datalist` returns it, bad entries left out.

    Raises:
        DatalistError: every problem at once (or, with ``skip``, when no entry is left).
    """
    header_problems: list[Problem] = []
    data = load_finetune_datalist(datalist, validate=True, progress=progress, collect=header_problems)
    if class_count is not None:
        header_problems += _class_index_problems(data, class_count)
    bad_headers = {p.entry for p in header_problems}
    checks = _finetune_checks(data, bad_headers, channels, labels) if read_voxels else []
    result = run_preflight(checks, cache=cache, progress=progress)
    result.problems[:0] = header_problems
    result.bad_entries |= bad_headers
    if read_voxels:
        logger.info("%s", summary_line(result))
    total = sum(len(data.get(s, [])) for s in SPLITS)
    bad = enforce(result, datalist=datalist, entries=total, skip=skip, report_dir=report_dir)
    return {k: ([e for i, e in enumerate(v) if (k, i) not in bad] if k in SPLITS else v) for k, v in data.items()}
