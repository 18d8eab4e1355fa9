"""Building datalists from folders: discover pretraining volumes; match, split and subset finetuning cases.

Only headers are read (NIfTI, DICOM series and multi-frame DICOM), in worker processes for
large trees. Finetuning cases are paired by file name, checked like a loaded datalist
(:mod:`.load`), split with a seed and subset with nested percentages.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import logging
import math
import multiprocessing
import os
import random
import re
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterable, Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from dinov2.data.dicom_series import folder_series_headers
from dinov2.data.image_io import (
    ImageHeaderError,
    VolumeHeader,
    dicom_multiframe_header,
    is_dicom_candidate,
    is_image_dataset,
    is_multiframe,
    is_nifti_path,
    read_dicom_slice_headers,
    read_header,
    strip_image_suffix,
)

from .format import SPLITS, Skipped
from .load import check_finetune_entry, progress_bar

logger = logging.getLogger(__name__)

DEFAULT_MODALITY_REGEX = r"^(?P<case>.+)_(?P<modality>[^_]+)$"
_GLOB_CHARS = re.compile(r"[*?\[]")
# Starting worker processes costs about a second; below this many files one process is faster.
MIN_FILES_FOR_PROCESSES = 2000
_START_METHOD = "spawn"  # see _run_jobs
_BATCH = 256  # NIfTI files per job: large enough to hide process overhead, small enough to balance
MAX_LOGGED_SKIPS = 100


def _report_skipped(skipped: Sequence[Skipped], what: str) -> None:
    if skipped:
        # A log of 5,000 identical lines hides more than it tells; the CLI writes the full list.
        lines = "\n".join(f"  {s.path}: {s.reason}" for s in skipped[:MAX_LOGGED_SKIPS])
        more = f"\n  ... and {len(skipped) - MAX_LOGGED_SKIPS} more" if len(skipped) > MAX_LOGGED_SKIPS else ""
        logger.warning("Skipped %d %s:\n%s%s", len(skipped), what, lines, more)


# --------------------------------------------------------------------------------------------
# pretraining datalist: discover volumes
# --------------------------------------------------------------------------------------------


def _expand_inputs(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[Path], list[Skipped]]:
    """Split inputs into files and folders; expand globs (``**`` recurses)."""
    files, folders, skipped = [], [], []
    for item in inputs:
        text = os.path.expanduser(str(item))
        matches = sorted(glob.glob(text, recursive=True)) if _GLOB_CHARS.search(text) else [text]
        if _GLOB_CHARS.search(text) and not matches:
            skipped.append(Skipped(text, "pattern matched no file or folder"))
        for match in matches:
            path = Path(match)
            if path.is_dir():
                folders.append(path)
            elif path.is_file():
                files.append(path)
            else:
                skipped.append(Skipped(str(path), "no such file or folder"))
    return files, folders, skipped


def _collect_candidates(
    files: list[Path], folders: list[Path]
) -> tuple[list[Path], dict[Path, list[Path]], list[Path]]:
    """NIfTI files, DICOM files grouped by folder, and explicitly named DICOM files."""
    nifti: set[Path] = set()
    dicom_by_folder: dict[Path, set[Path]] = defaultdict(set)
    dicom_files: set[Path] = set()
    for file in files:
        if is_nifti_path(file):
            nifti.add(file.absolute())
        elif is_dicom_candidate(file):
            dicom_files.add(file.absolute())
    for folder in folders:
        for root, _dirs, names in os.walk(folder):
            for name in names:
                path = Path(root, name).absolute()
                if is_nifti_path(name):
                    nifti.add(path)
                elif is_dicom_candidate(path):
                    dicom_by_folder[path.parent].add(path)
    # A DICOM file named explicitly and also found by walking its folder is read once, with its folder.
    dicom_files = {f for f in dicom_files if f not in dicom_by_folder.get(f.parent, ())}
    return sorted(nifti), {k: sorted(v) for k, v in sorted(dicom_by_folder.items())}, sorted(dicom_files)


def _dicom_folder_volumes(folder: Path, files: list[Path]) -> tuple[list[VolumeHeader], list[Skipped]]:
    """Volumes in one folder: each multi-frame file, plus the folder as one series (``FOLDER::UID`` each when
    it holds several)."""
    readable, errors = read_dicom_slice_headers(files)
    volumes, skipped = [], []
    if errors:
        names = ", ".join(e.path.name for e in errors[:5])
        skipped.append(Skipped(str(folder), f"{len(errors)} unreadable DICOM file(s) ({names}): {errors[0].reason}"))
        return volumes, skipped
    slices = []
    for path, dataset in readable:
        if not is_image_dataset(dataset):
            skipped.append(Skipped(str(path), "DICOM object without pixel rows/columns (not an image); ignored"))
        elif is_multiframe(dataset):
            try:
                volumes.append(dicom_multiframe_header(path, dataset))
            except ImageHeaderError as exc:
                skipped.append(Skipped(str(path), _in_words(exc)))
        else:
            slices.append((path, dataset))
    if slices:
        if len(slices) < len(readable) and any(is_multiframe(ds) for _, ds in readable):
            reason = "folder mixes multi-frame files and single slices; move the slices into their own folder"
            skipped.append(Skipped(str(folder), reason))
        else:
            for result in folder_series_headers(folder, slices):
                if isinstance(result, ImageHeaderError):
                    skipped.append(Skipped(str(result.path), result.reason))
                else:
                    volumes.append(result)
    return volumes, skipped


def _in_words(exc: ImageHeaderError) -> str:
    """The reason of a header error with reader internals (``BadGzipFile: ...``) put into words."""
    from dinov2.data.validation import explain_read_error  # noqa: PLC0415 - imports MONAI; only on a bad file

    if exc.path.is_file() and exc.path.stat().st_size == 0:
        return "the file is empty (0 bytes); copy it again or remove it"
    words = explain_read_error(exc)
    return f"{words}; {exc.fix}" if words and exc.fix else words or exc.reason


def _read_files(paths: list[Path]) -> tuple[list[VolumeHeader], list[Skipped]]:
    """Headers of NIfTI or multi-frame DICOM files named one by one."""
    volumes, skipped = [], []
    for path in paths:
        try:
            volumes.append(read_header(path))
        except ImageHeaderError as exc:
            skipped.append(Skipped(str(path), _in_words(exc)))
    return volumes, skipped


def _run_jobs(jobs: list[tuple], workers: int, bar) -> tuple[list[VolumeHeader], list[Skipped]]:
    """Run ``(function, args, n_files)`` jobs inline or in worker processes, ticking ``bar``.

    Header parsing is pure Python (pydicom, struct), so threads would share one core; processes
    scale with cores. ``spawn`` keeps workers safe when the caller has threads (torch, tqdm).
    """
    headers: list[VolumeHeader] = []
    skipped: list[Skipped] = []
    if workers <= 1 or len(jobs) <= 1 or sum(size for _, _, size in jobs) < MIN_FILES_FOR_PROCESSES:
        for function, args, size in jobs:
            volumes, problems = function(*args)
            headers.extend(volumes)
            skipped.extend(problems)
            bar.update(size)
        return headers, skipped
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(_START_METHOD)) as pool:
        futures = {pool.submit(function, *args): size for function, args, size in jobs}
        for future in as_completed(futures):
            volumes, problems = future.result()
            headers.extend(volumes)
            skipped.extend(problems)
            bar.update(futures[future])
    return headers, skipped


def _check_size(header: VolumeHeader, min_size: Sequence[int]) -> str | None:
    if header.ndim not in (3, 4):
        return f"{header.ndim}D volume of shape {list(header.shape)}; only 3D and 4D volumes are used"
    small = [f"axis {i}: {n} < {m}" for i, (n, m) in enumerate(zip(header.spatial_shape, min_size)) if n < m]
    if small:
        return f"smaller than --min-size {list(min_size)} ({', '.join(small)}; shape {list(header.shape)})"
    return None


def _normalise_min_size(min_size: int | Sequence[int]) -> tuple[int, int, int]:
    values = [min_size] * 3 if isinstance(min_size, int) else list(min_size)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or any(not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"min_size must be one positive integer or three (per spatial axis), got {min_size!r}.")
    return tuple(values)  # type: ignore[return-value]


def header_entry(header: VolumeHeader) -> dict:
    """Pretraining entry ``{"image", "shape", "spacing"}`` for a volume header."""
    return {
        "image": str(header.path),
        "shape": [int(s) for s in header.shape],
        "spacing": [round(float(s), 6) for s in header.spacing],
    }


def build_pretrain_datalist(
    inputs: Iterable[str | os.PathLike],
    min_size: int | Sequence[int] = 1,
    progress: bool = True,
    workers: int = 1,
) -> tuple[list[dict], list[Skipped]]:
    """Scan folders, globs and files for NIfTI and DICOM volumes, reading headers only.

    A folder of single-frame DICOM slices is one volume (its path is the folder); a multi-frame
    DICOM file is one volume. Folders are searched recursively.

    Args:
        inputs: folders, files or glob patterns (``**`` matches any depth).
        min_size: minimum voxels per spatial axis, one int for all axes or three.
        progress: show a tqdm progress bar (with ETA) while reading headers.
        workers: processes reading headers, used from ``MIN_FILES_FOR_PROCESSES`` files on
            (started with ``spawn``: a calling script needs the ``if __name__ == "__main__"`` guard).

    Returns:
        ``(entries, skipped)``: entries sorted by path, each ``{"image": absolute path,
        "shape": [...], "spacing": [sx, sy, sz]}``; and every file left out with its reason
        (also logged as one warning).
    """
    minimum = _normalise_min_size(min_size)
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}.")
    files, folders, skipped = _expand_inputs(inputs)
    nifti, dicom_groups, dicom_files = _collect_candidates(files, folders)
    singles = nifti + dicom_files
    batches = [singles[i : i + _BATCH] for i in range(0, len(singles), _BATCH)]
    jobs: list[tuple] = [(_read_files, (batch,), len(batch)) for batch in batches]
    jobs += [(_dicom_folder_volumes, (folder, group), len(group)) for folder, group in dicom_groups.items()]
    total = len(singles) + sum(len(v) for v in dicom_groups.values())
    with logging_redirect_tqdm(), progress_bar(None, total, "reading headers", progress) as bar:
        headers, problems = _run_jobs(jobs, workers, bar)
    skipped.extend(problems)
    entries = []
    for header in headers:
        reason = _check_size(header, minimum)
        if reason:
            skipped.append(Skipped(str(header.path), reason))
        else:
            entries.append(header_entry(header))
    entries.sort(key=lambda e: e["image"])
    skipped.sort(key=lambda s: s.path)
    _report_skipped(skipped, "files/folders while building the pretraining datalist")
    logger.info("Found %d volumes (%d skipped).", len(entries), len(skipped))
    return entries, skipped


# --------------------------------------------------------------------------------------------
# finetuning datalist: match, split, subset
# --------------------------------------------------------------------------------------------


def _list_images(folder: Path) -> dict[str, Path]:
    """Stem -> path for NIfTI files and DICOM series subfolders directly inside ``folder``."""
    if not folder.is_dir():
        raise ValueError(f"Image folder {folder} does not exist; pass an existing folder with --images.")
    out = {}
    for path in sorted(folder.iterdir()):
        if (path.is_file() and is_nifti_path(path)) or path.is_dir():
            out[strip_image_suffix(path.name)] = path.absolute()
    return out


def _read_label_csv(path: Path) -> dict[str, int]:
    """``name,label`` rows (header line required) -> {case name: class index}."""
    labels = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"name", "label"} <= set(reader.fieldnames):
            raise ValueError(f"Label CSV {path} needs a header line with columns 'name' and 'label'.")
        for row_number, row in enumerate(reader, start=2):
            try:
                value = int(row["label"])
            except ValueError as exc:
                message = f"Label CSV {path} line {row_number}: label {row['label']!r} is not an integer."
                raise ValueError(message) from exc
            if value < 0:
                raise ValueError(f"Label CSV {path} line {row_number}: label {value} is negative.")
            labels[strip_image_suffix(row["name"].strip())] = value
    return labels


def match_cases(
    image_dir: str | os.PathLike,
    label_dir: str | os.PathLike | None = None,
    label_csv: str | os.PathLike | None = None,
    label_suffix: str = "",
    modalities: Sequence[str] | None = None,
    modality_regex: str = DEFAULT_MODALITY_REGEX,
) -> tuple[list[dict], list[Skipped]]:
    """Pair images with labels by file name (extensions stripped).

    Args:
        image_dir: folder of NIfTI files (or DICOM series subfolders).
        label_dir: folder of label NIfTI files named ``<case><label_suffix>``; may be ``image_dir``.
        label_csv: alternative to ``label_dir`` for classification: CSV with ``name,label``.
        label_suffix: text after the case name in label file names (e.g. ``"_seg"``).
        modalities: if given, image names are ``<case>_<modality>`` (see ``modality_regex``) and
            each entry's ``image`` is the list of files in this modality order.
        modality_regex: regex with named groups ``case`` and ``modality`` matched on image stems.

    Returns:
        ``(entries, skipped)``: ``{"image", "label", "name"}`` entries sorted by case name, and
        cases left out (no label, missing modality, ...) with reasons.
    """
    if (label_dir is None) == (label_csv is None):
        raise ValueError("Give exactly one of label_dir (segmentation masks) or label_csv (class indices).")
    images = _list_images(Path(image_dir))
    if label_dir is not None:
        labels: dict[str, Any] = _list_labels(Path(label_dir), label_suffix)
        label_paths = {Path(p) for p in labels.values()}
        images = {k: v for k, v in images.items() if v not in label_paths}  # labels may share the image folder
    else:
        labels = _read_label_csv(Path(label_csv))
    if modalities:
        cases, skipped = _group_modalities(images, modalities, modality_regex)
    else:
        cases, skipped = {stem: str(path) for stem, path in images.items()}, []
    entries, unpaired = _pair_cases(cases, labels, label_suffix)
    return entries, skipped + unpaired


def _list_labels(label_folder: Path, label_suffix: str) -> dict[str, str]:
    """Case name -> label file path for the NIfTI files of ``label_folder`` named ``<case><label_suffix>``."""
    if not label_folder.is_dir():
        raise ValueError(f"Label folder {label_folder} does not exist; pass an existing folder with --labels.")
    label_files = {
        strip_image_suffix(p.name): p.absolute()
        for p in sorted(label_folder.iterdir())
        if p.is_file() and is_nifti_path(p)
    }
    labels: dict[str, str] = {}
    for stem, path in label_files.items():
        if label_suffix and not stem.endswith(label_suffix):
            continue
        labels[stem[: len(stem) - len(label_suffix)] if label_suffix else stem] = str(path)
    return labels


def _group_modalities(
    images: dict[str, Path], modalities: Sequence[str], modality_regex: str
) -> tuple[dict[str, list[str]], list[Skipped]]:
    """Groups ``<case>_<modality>`` image stems into cases.

    Returns:
        ``(cases, skipped)``: case -> image paths in ``modalities`` order, for the cases that
        have every modality, and the cases that lack some, sorted by case name.
    """
    pattern = re.compile(modality_regex)
    if not {"case", "modality"} <= set(pattern.groupindex):
        raise ValueError(
            f"modality_regex {modality_regex!r} needs named groups (?P<case>...) and (?P<modality>...)."
        )
    grouped: dict[str, dict[str, Path]] = defaultdict(dict)
    for stem, path in images.items():
        match = pattern.match(stem)
        if match and match["modality"] in modalities:
            grouped[match["case"]][match["modality"]] = path
    cases: dict[str, list[str]] = {}
    skipped: list[Skipped] = []
    for case, found in sorted(grouped.items()):
        missing = [m for m in modalities if m not in found]
        if missing:
            skipped.append(Skipped(case, f"missing modality file(s) {missing} (found {sorted(found)})"))
        else:
            cases[case] = [str(found[m]) for m in modalities]
    return cases, skipped


def _pair_cases(
    cases: dict[str, Any], labels: dict[str, Any], label_suffix: str
) -> tuple[list[dict], list[Skipped]]:
    """Pairs case images with labels by case name.

    Returns:
        ``(entries, skipped)``: ``{"image", "label", "name"}`` entries sorted by case name, then
        the cases without a label and the labels without an image.
    """
    entries, skipped = [], []
    for case in sorted(cases):
        if case not in labels:
            skipped.append(Skipped(case, f"no label found (looked for '{case}{label_suffix}' in the labels)"))
            continue
        entries.append({"image": cases[case], "label": labels[case], "name": case})
    for case in sorted(set(labels) - set(cases)):
        where = str(labels[case]) if isinstance(labels[case], str) else case
        skipped.append(Skipped(where, f"label without an image for case '{case}'"))
    return entries, skipped


def _split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    raw = [f * n for f in fractions]
    counts = [math.floor(r) for r in raw]
    # Largest remainder: hand the leftover cases to the splits that lost most to rounding down.
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def split_entries(
    entries: Sequence[dict], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, list[dict]]:
    """Shuffle with ``seed`` and cut into training / validation / test.

    Args:
        entries: finetuning entries.
        fractions: three non-negative fractions summing to 1.
        seed: the same seed and entries always give the same split.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``, each in input order.
    """
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"Split fractions must be three non-negative numbers summing to 1 (e.g. 0.7 0.15 0.15), got {fractions}."
        )
    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    counts = _split_counts(len(entries), fractions)
    out, start = {}, 0
    for name, count, fraction in zip(SPLITS, counts, fractions):
        chosen = sorted(order[start : start + count])
        start += count
        out[name] = [entries[i] for i in chosen]
        if fraction > 0 and count == 0:
            logger.warning("Split '%s' (fraction %g) received no case out of %d.", name, fraction, len(entries))
    return out


def _image_key_parts(entry: dict) -> list[list[str]]:
    image = entry.get("image")
    images = image if isinstance(image, list) else [image]
    return [Path(str(p)).as_posix().split("/") for p in images]


def subset_training(entries: Sequence[dict], percent: float, seed: int = 0) -> list[dict]:
    """Deterministic ``percent`` % subset of the training entries, nested across percentages.

    Each entry gets a rank from a hash of ``seed`` and its image path(s) with the folder prefix
    shared by all entries removed, so the subset does not depend on list order or on where the
    dataset folder lives, and the 25 % subset is always inside the 50 % subset (same ranks,
    shorter prefix).

    Args:
        entries: training entries (dicts with ``"image"``).
        percent: in ``(0, 100]``; the subset keeps ``ceil(len * percent / 100)`` entries.
        seed: changes which entries are kept.

    Returns:
        The kept entries, in their input order.
    """
    if not 0 < percent <= 100:
        raise ValueError(f"dataset percent must be in (0, 100], got {percent}.")
    entries = list(entries)
    if not entries:
        return []
    parts = [_image_key_parts(e) for e in entries]
    flat = [p for per_entry in parts for p in per_entry]
    common = 0
    while all(len(p) > common + 1 and p[common] == flat[0][common] for p in flat):
        common += 1
    keys = ["|".join("/".join(p[common:]) for p in per_entry) for per_entry in parts]
    ranks = sorted(range(len(entries)), key=lambda i: (hashlib.sha256(f"{seed}\0{keys[i]}".encode()).hexdigest(), i))
    keep = max(1, math.ceil(len(entries) * percent / 100 - 1e-9))
    kept = sorted(ranks[:keep])
    return [entries[i] for i in kept]


def build_finetune_datalist(
    image_dir: str | os.PathLike,
    label_dir: str | os.PathLike | None = None,
    label_csv: str | os.PathLike | None = None,
    label_suffix: str = "",
    modalities: Sequence[str] | None = None,
    modality_regex: str = DEFAULT_MODALITY_REGEX,
    split: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    dataset_percent: float = 100.0,
    progress: bool = True,
) -> tuple[dict, list[Skipped]]:
    """Match images and labels by name, drop cases that fail validation, split, subset training.

    See :func:`match_cases` for matching arguments, :func:`split_entries` for ``split``/``seed``
    and :func:`subset_training` for ``dataset_percent`` (applied to training only).

    Returns:
        ``(datalist, skipped)``: ``{"training", "validation", "test"}`` plus ``"meta"`` (split,
        seed, dataset_percent) with absolute paths, and cases left out with reasons.
    """
    entries, skipped = match_cases(image_dir, label_dir, label_csv, label_suffix, modalities, modality_regex)
    cache: dict[str, VolumeHeader | ImageHeaderError] = {}
    good = []
    with logging_redirect_tqdm():
        for entry in progress_bar(entries, len(entries), "checking cases", progress):
            pair = {"image": entry["image"], "label": entry["label"]}
            problems = check_finetune_entry(pair, "case", Path("/"), True, cache)
            if problems:
                # the row names the file at fault (the case name when no file is involved)
                at_fault = next((p.path for p in problems if p.path), None) or entry["name"]
                reasons = "; ".join(f"{p.where} {p.path + ': ' if p.path else ''}{p.reason}" for p in problems)
                skipped.append(Skipped(at_fault, f"case {entry['name']}: {reasons}"))
            else:
                good.append(entry)
    datalist: dict[str, Any] = split_entries(good, split, seed)
    if dataset_percent < 100:
        datalist["training"] = subset_training(datalist["training"], dataset_percent, seed)
    datalist["meta"] = {"split": list(split), "seed": seed, "dataset_percent": dataset_percent}
    _report_skipped(skipped, "cases while building the finetuning datalist")
    logger.info("Datalist: %s.", ", ".join(f"{len(datalist[s])} {s}" for s in SPLITS))
    return datalist, skipped
