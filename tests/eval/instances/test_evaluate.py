"""Scoring predicted label stacks against references (dinov2/eval/instances/evaluate.py)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from dinov2.data.datalist import write_datalist
from dinov2.eval.instances import io
from dinov2.eval.instances.evaluate import evaluate_pairs, main
from dinov2.eval.instances.metrics import instance_scores

pytest.importorskip("tifffile", reason="TIFF stacks need the optional extra 'instances'")

SHAPE = (12, 10, 8)


def _reference(seed: int) -> np.ndarray:
    """Three boxes, placed by ``seed``."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(SHAPE, np.int32)
    for i in range(3):
        x, y = 4 * i, int(rng.integers(0, 5))
        labels[x:x + 3, y:y + 4, 1:6] = i + 1
    return labels


def _prediction(reference: np.ndarray) -> np.ndarray:
    """Objects 1 and 2 merged, object 3 cut short, one spurious object."""
    predicted = np.where(reference == 2, 1, reference)
    predicted[8:10] = np.where(predicted[8:10] == 3, 0, predicted[8:10])
    predicted[:2, :2, 7] = 9
    return predicted


def _write(path, labels, kind):
    like = io.new_stack(labels, (1, 1, 1), kind, path)
    return io.write_labels(path, labels, like)


@pytest.fixture()
def cases(tmp_path):
    """References ``a`` (TIFF), ``b`` (NIfTI), ``c`` (no prediction); predictions for a, b and ``z``
    (no reference); the expected scores of a and b."""
    refs, preds = tmp_path / "refs", tmp_path / "preds"
    expected = {}
    for name, kind, ext, seed in (("a", "tiff", ".tif", 0), ("b", "nifti", ".nii.gz", 1), ("c", "tiff", ".tif", 2)):
        reference = _reference(seed)
        _write(refs / f"{name}{ext}", reference, kind)
        if name != "c":
            predicted = _prediction(reference)
            _write(preds / f"{name}_instances{ext}", predicted, kind)
            expected[name] = instance_scores(reference, predicted).as_dict()
    _write(preds / "z_instances.tif", _reference(3), "tiff")
    return refs, preds, expected


def _same(row: dict, scores: dict):
    for key, value in scores.items():
        assert (math.isnan(value) and row[key] is None) or row[key] == pytest.approx(value), key


def test_command_scores_pairs_by_name_and_lists_the_unmatched(cases, tmp_path, capsys):
    refs, preds, expected = cases
    assert main(["--predictions", str(preds), "--references", str(refs), "--output", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "instance_metrics.json").read_text())
    assert [row["name"] for row in result["cases"]] == ["a", "b"]
    for row in result["cases"]:
        _same(row, expected[row["name"]])
    assert result["mean"]["op_csb"] == pytest.approx((expected["a"]["op_csb"] + expected["b"]["op_csb"]) / 2)
    assert result["unmatched"]["predictions"] == [str(preds / "z_instances.tif")]
    assert result["unmatched"]["references"] == ["c.tif"]

    with open(tmp_path / "out" / "instance_metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == ["a", "b", "mean"]
    assert float(rows[1]["seg"]) == pytest.approx(expected["b"]["seg"])
    assert int(rows[0]["count_error"]) == expected["a"]["count_error"] == 0  # 3 objects: 2 merged + 1 spurious
    assert float(rows[2]["f1"]) == pytest.approx(result["mean"]["f1"])

    out = capsys.readouterr().out
    assert "OP_CSB" in out and "mean" in out and "1 prediction(s) without reference" in out


def test_datalist_references_use_the_test_split(cases, tmp_path):
    refs, preds, expected = cases
    datalist = {"training": [{"image": str(tmp_path / "img" / "c.tif"), "label": str(refs / "c.tif")}],
                "validation": [],
                "test": [{"image": str(tmp_path / "img" / "a.tif"), "label": str(refs / "a.tif")},
                         {"image": str(tmp_path / "img" / "b.nii.gz"), "label": str(refs / "b.nii.gz")}]}
    path = write_datalist(datalist, tmp_path / "fold.json", relative=True)
    out = tmp_path / "out"
    assert main(["--predictions", str(preds), "--references", str(path), "--output", str(out)]) == 0
    result = json.loads((out / "instance_metrics.json").read_text())
    assert [row["name"] for row in result["cases"]] == ["a", "b"]
    _same(result["cases"][1], expected["b"])
    assert main(["--predictions", str(preds), "--references", str(path), "--output", str(out),
                 "--split", "training"]) == 1  # no prediction is named c


def test_mismatched_shapes_and_no_match_end_with_one_error_line(tmp_path, capsys):
    _write(tmp_path / "refs" / "a.tif", np.ones((4, 4, 4), np.int32), "tiff")
    _write(tmp_path / "preds" / "a_instances.tif", np.ones((4, 4, 5), np.int32), "tiff")
    _write(tmp_path / "other" / "x_instances.tif", np.ones((4, 4, 4), np.int32), "tiff")
    args = ["--references", str(tmp_path / "refs"), "--output", str(tmp_path / "out")]
    assert main(["--predictions", str(tmp_path / "preds")] + args) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("ERROR: ") and "a_instances.tif" in line and "a.tif" in line and "shape" in line
    assert main(["--predictions", str(tmp_path / "other")] + args) == 1
    assert "matches a reference" in capsys.readouterr().err


def test_evaluate_pairs_is_instance_scores_per_pair():
    reference = _reference(0)
    rows = evaluate_pairs([("x", reference, reference), ("y", reference, _prediction(reference))])
    assert rows[0]["name"] == "x" and rows[0]["op_csb"] == 1.0
    assert rows[1] == {"name": "y", **instance_scores(reference, _prediction(reference)).as_dict()}
