"""Score predicted instance label stacks against their references (see :mod:`.metrics` for the measures).

Command line::

    python -m dinov2.eval.instances evaluate --predictions DIR_OR_FILE --references DIR_OR_DATALIST
        --output DIR [--split test|validation|training|all]

Pairing is by name: a prediction ``<stem>_instances.<ext>`` (as ``segment`` and ``baseline`` write
them; a name without ``_instances`` is its own stem) belongs to

* in a reference folder (or file): the label stack named ``<stem>.<ext>``, or else the only one
  named ``<stem>_...`` / ``<stem>-...`` (any format: a TIFF prediction may be scored against a
  NIfTI reference of the same shape);
* in a datalist (the finetuning layout): the entry of ``--split`` whose image is ``<stem>.<ext>``;
  its ``label`` is the reference.

Predictions and references left without a partner are listed (and written in the JSON); they
are not scored. Writes ``DIR/instance_metrics.json`` (per case, mean, unmatched) and
``DIR/instance_metrics.csv`` (one row per case, then the mean) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from dinov2.data.datalist import load_finetune_datalist
from dinov2.data.datalist.format import SPLITS
from dinov2.utils.entry_point import add_debug_flag, entry_point, start_entry_point
from dinov2.utils.errors import UsageError

from .io import list_stacks, read_labels, stack_stem
from .metrics import instance_scores

logger = logging.getLogger("dinov2.eval.instances.evaluate")

PREDICTION_SUFFIX = "_instances"
# The columns of the table and the CSV, after the case name: (key of instance_scores, title).
COLUMNS = (("seg", "SEG"), ("det", "DET"), ("op_csb", "OP_CSB"), ("precision", "precision"),
           ("recall", "recall"), ("f1", "F1"), ("count_error", "count_err"), ("n_ref", "n_ref"),
           ("n_pred", "n_pred"))
UNIT_SPACING = (1.0, 1.0, 1.0)
JSON_NAME, CSV_NAME = "instance_metrics.json", "instance_metrics.csv"


def evaluate_pairs(pairs: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> list[dict]:
    """Every measure of every ``(name, reference, prediction)`` pair.

    Args:
        pairs: ``(name, reference (X, Y, Z), prediction (X, Y, Z))``: integer instance labels of
            one shape per pair, 0 = background.

    Returns:
        One dict per pair, in order: ``name`` and the fields of
        :class:`~dinov2.eval.instances.metrics.InstanceScores`.
    """
    return [{"name": name, **instance_scores(reference, predicted).as_dict()} for name, reference, predicted in pairs]


def mean_scores(rows: Sequence[dict]) -> dict:
    """The mean of each measure of :data:`COLUMNS` over ``rows``, NaN values left out (a case
    without reference objects has no SEG); NaN when no row has a value."""
    means: dict = {"name": "mean"}
    for key, _ in COLUMNS:
        values = np.array([row[key] for row in rows], dtype=np.float64)
        means[key] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return means


# --------------------------------------------------------------------------------------------
# pairing by name
# --------------------------------------------------------------------------------------------


def prediction_key(path: str | os.PathLike) -> str:
    """The stem a prediction stands for: ``cells_instances.tif`` -> ``cells``."""
    stem = stack_stem(path)
    return stem[: -len(PREDICTION_SUFFIX)] if stem.endswith(PREDICTION_SUFFIX) else stem


def _folder_references(path: Path, keys: Sequence[str]) -> dict[str, Path]:
    """Per prediction key, its reference stack in a folder (or the one file given)."""
    files = list_stacks(path)
    by_stem: dict[str, list[Path]] = {}
    for file in files:
        by_stem.setdefault(stack_stem(file), []).append(file)
    found: dict[str, Path] = {}
    for key in keys:
        exact = by_stem.get(key, [])
        candidates = exact or [f for f in files if stack_stem(f).startswith((key + "_", key + "-"))]
        if len(candidates) > 1:
            names = ", ".join(f.name for f in candidates)
            raise UsageError(f"{path}: several references could be the one of '{key}' ({names}); "
                             "keep one per name in the reference folder")
        if candidates:
            found[key] = candidates[0]
    return found


def _datalist_references(path: Path, split: str) -> tuple[dict[str, Path], list[str]]:
    """``(key -> label stack, names of labelled entries)`` of a datalist's ``split`` (``"all"``: every split)."""
    data = load_finetune_datalist(path, validate=False, progress=False)
    found: dict[str, Path] = {}
    for name in SPLITS if split == "all" else (split,):
        for entry in data.get(name, []):
            image, label = entry.get("image"), entry.get("label")
            image = image[0] if isinstance(image, list) and len(image) == 1 else image
            if isinstance(image, str) and isinstance(label, str):
                found[stack_stem(image)] = Path(label)
    if not found:
        raise UsageError(f"{path}: no labelled entry in the '{split}' split; choose another with --split "
                         f"({', '.join(SPLITS)} or all)")
    return found, sorted(found)


def match_predictions(predictions: str | os.PathLike, references: str | os.PathLike,
                      split: str = "test") -> tuple[list[tuple[str, Path, Path]], list[Path], list[str]]:
    """Pair prediction stacks with their reference label stacks by name (rules in the module docstring).

    Returns:
        ``(pairs, unmatched predictions, unmatched references)``: ``(name, reference, prediction)``
        sorted by name; predictions without a reference; the references (file names, or datalist
        image stems) without a prediction.

    Raises:
        UserError: no prediction stack, two predictions for one name, or no pair at all.
    """
    predicted = list_stacks(predictions)
    keyed: dict[str, Path] = {}
    for path in predicted:
        key = prediction_key(path)
        if key in keyed:
            raise UsageError(f"{predictions}: two predictions for '{key}' ({keyed[key].name}, {path.name}); "
                             "keep one per name")
        keyed[key] = path
    references = Path(references)
    if references.is_file() and references.name.lower().endswith(".json"):
        refs, all_refs = _datalist_references(references, split)
    else:
        refs = _folder_references(references, list(keyed))
        all_refs = [f.name for f in list_stacks(references)]
    pairs = [(key, refs[key], keyed[key]) for key in sorted(keyed) if key in refs]
    unmatched_predictions = [keyed[key] for key in sorted(keyed) if key not in refs]
    used = {str(reference) for _, reference, _ in pairs} | {reference.name for _, reference, _ in pairs}
    used |= {key for key, _, _ in pairs}
    unmatched_references = [name for name in all_refs if name not in used]
    if not pairs:
        raise UsageError(f"no prediction in {predictions} matches a reference in {references} by name "
                         f"(predictions: {', '.join(p.name for p in predicted[:5])}"
                         f"{'...' if len(predicted) > 5 else ''}); a prediction <stem>{PREDICTION_SUFFIX}.<ext> "
                         "is scored against the reference <stem>.<ext>")
    return pairs, unmatched_predictions, unmatched_references


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def _cell(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def format_table(rows: Sequence[dict], mean: dict) -> str:
    """The per-case rows and the mean as an aligned text table."""
    header = ["case"] + [title for _, title in COLUMNS]
    body = [[str(row["name"])] + [_cell(row[key]) for key, _ in COLUMNS] for row in rows]
    body.append(["mean"] + [_cell(mean[key]) for key, _ in COLUMNS])
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    lines = ["  ".join(text.ljust(w) if i == 0 else text.rjust(w) for i, (text, w) in enumerate(zip(line, widths)))
             for line in [header] + body]
    return "\n".join(lines[:-1] + ["-" * len(lines[0]), lines[-1]])


def _json_value(value):
    """NaN as null: strict JSON has no NaN."""
    return None if isinstance(value, float) and math.isnan(value) else value


def write_results(folder: Path, rows: Sequence[dict], mean: dict, unmatched: dict) -> tuple[Path, Path]:
    """Write :data:`JSON_NAME` and :data:`CSV_NAME` into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"cases": [{k: _json_value(v) for k, v in row.items()} for row in rows],
               "mean": {k: _json_value(v) for k, v in mean.items()}, "unmatched": unmatched}
    json_path, csv_path = folder / JSON_NAME, folder / CSV_NAME
    json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    fields = ["name"] + [key for key in rows[0] if key != "name"] if rows else ["name"]
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        writer.writerow(mean)
    return json_path, csv_path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dinov2.eval.instances evaluate",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", required=True, help="a predicted label stack or a folder of them")
    parser.add_argument("--references", required=True,
                        help="a folder of reference label stacks (or one), or a datalist JSON whose entries' labels are")
    parser.add_argument("--output", required=True, help=f"folder for {JSON_NAME} and {CSV_NAME} (created)")
    parser.add_argument("--split", choices=SPLITS + ("all",), default="test",
                        help="with a datalist: the split whose labels are the references (default test)")
    add_debug_flag(parser)
    return parser


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """``evaluate``: pair, score, print the table, write the JSON and CSV."""
    args = _parser().parse_args(argv)
    start_entry_point(tune_allocator=False)
    pairs, lone_predictions, lone_references = match_predictions(args.predictions, args.references, args.split)
    where = f"the '{args.split}' split of {args.references}" if str(args.references).endswith(".json") \
        else str(args.references)
    for path in lone_predictions:
        logger.warning("no reference for the prediction %s in %s: not scored", path, where)
    if lone_references:
        logger.warning("no prediction for %d reference(s): %s", len(lone_references), ", ".join(lone_references))
    arrays = []
    for name, reference_path, prediction_path in pairs:
        # the measures count voxels, so the spacing plays no part (and a missing one is no news here)
        reference = read_labels(reference_path, spacing=UNIT_SPACING)
        # read against the reference: a shape mismatch names both files
        prediction = read_labels(prediction_path, like=reference, spacing=UNIT_SPACING)
        arrays.append((name, reference.array, prediction.array))
    rows = evaluate_pairs(arrays)
    mean = mean_scores(rows)
    unmatched = {"predictions": [str(p) for p in lone_predictions], "references": list(lone_references)}
    json_path, csv_path = write_results(Path(args.output), rows, mean, unmatched)
    print(format_table(rows, mean))
    if lone_predictions or lone_references:
        print(f"unmatched: {len(lone_predictions)} prediction(s) without reference, "
              f"{len(lone_references)} reference(s) without prediction (listed in {json_path.name})")
    print(f"wrote {json_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
