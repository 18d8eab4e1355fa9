"""The datalist builder (``dinov2.data.datalist.cli.main``) against every kind of bad input (issue #14).

``pretrain`` and ``finetune`` read headers only: a file whose header cannot be used is left out
with one warning line naming it, listed in ``<datalist>.skipped.tsv`` (``path``, ``reason``), the
datalist of the others is written, and the exit code is 1; no traceback. Damage that only the
voxels show passes the builder and is caught by the pre-flight of the job that reads the
datalist (tests/bad_inputs/test_train3d.py, test_segmentation_finetune.py, test_linear.py). The
matrix:

==============================  ===================================  ===========================
kind                            pretrain                             finetune (image or label)
==============================  ===================================  ===========================
empty                           skipped: the file is empty           skipped, names the image
truncated_gzip                  kept (header reads; pre-flight)      kept (header reads)
random_bytes                    skipped: not gzip-compressed         skipped, names the image
2d                              skipped: 2D volume                   skipped, names the image
4d                              kept                                 kept
5d                              skipped: 5D volume                   skipped, names the image
all_nan                         kept (header only; pre-flight)       kept (header only)
some_inf (partial +-Inf)        kept                                 kept
smaller_than_crop (6^3)         skipped with --min-size 8, else kept kept (no size filter)
label_shape_mismatch            n/a                                  skipped, names the label
                                                                     map and its image
label_affine_mismatch           n/a                                  same: affine
label_values_outside_classes    n/a                                  kept (the builder knows no
                                                                     classes; pre-flight)
missing input / label           skipped: no such file or folder      skipped: no label found
checkpoint kinds                n/a                                  n/a
==============================  ===================================  ===========================

Datalist kinds belong to ``validate``: not JSON and missing keys are in tests/data/
test_cli_errors.py; a datalist pointing to a missing file is here.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from dinov2.data.datalist.cli import main

# kind -> (outcome, words of the reason)
PRETRAIN = {
    "empty": ("skipped", "the file is empty (0 bytes)"),
    "truncated_gzip": ("kept", None),
    "random_bytes": ("skipped", "is not gzip-compressed data"),
    "2d": ("skipped", "2D volume"),
    "4d": ("kept", None),
    "5d": ("skipped", "5D volume"),
    "all_nan": ("kept", None),
    "some_inf": ("kept", None),
    "smaller_than_crop": ("skipped", "smaller than --min-size [8, 8, 8]"),
}
FINETUNE = {
    "empty": ("skipped", "the file is empty (0 bytes)"),
    "truncated_gzip": ("kept", None),
    "random_bytes": ("skipped", "header unreadable"),
    "2d": ("skipped", "2D volume"),
    "4d": ("kept", None),
    "5d": ("skipped", "5D volume"),
    "all_nan": ("kept", None),
    "some_inf": ("kept", None),
    "smaller_than_crop": ("kept", None),
    "label_shape_mismatch": ("skipped", "spatial shape [16, 16, 12] != [16, 16, 16]"),
    "label_affine_mismatch": ("skipped", "affine differs"),
    "label_values_outside_classes": ("kept", None),
}


def skipped_rows(datalist: Path) -> list[dict]:
    report = Path(str(datalist) + ".skipped.tsv")
    if not report.exists():
        return []
    with open(report, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def check_batch(code: int, datalist: Path, at_fault: Path | str | None, words: str | None, capsys, caplog) -> str:
    """Exit code, skipped.tsv and the warning line of a build that left ``at_fault`` out (None: kept all)."""
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out + caplog.text
    assert "ERROR" not in captured.err
    written = json.dumps(json.loads(datalist.read_text()))
    if at_fault is None:
        assert code == 0 and skipped_rows(datalist) == []
        return written
    assert code == 1
    (row,) = skipped_rows(datalist)
    assert row["path"] == str(at_fault) and words in row["reason"], row
    warned = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and str(at_fault) in r.getMessage()]
    assert len(warned) == 1 and words in warned[0], warned
    assert f"skipped, listed in {datalist}.skipped.tsv" in captured.out
    return written


def test_the_tables_cover_every_kind(bad):
    assert set(PRETRAIN) == set(bad.IMAGE_KINDS)
    assert set(FINETUNE) == set(bad.IMAGE_KINDS) | set(bad.LABEL_KINDS)


@pytest.mark.parametrize("kind", list(PRETRAIN))
def test_pretrain_kind(kind, tmp_path, bad, capsys, caplog):
    outcome, words = PRETRAIN[kind]
    good = bad.good(tmp_path / "in" / "good.nii.gz")
    image = bad.IMAGE_KINDS[kind](tmp_path / "in" / f"{kind}.nii.gz")
    datalist = tmp_path / "pretrain.json"
    code = main(["pretrain", str(tmp_path / "in"), "-o", str(datalist), "--min-size", "8", "--no-progress"])
    written = check_batch(code, datalist, image if outcome == "skipped" else None, words, capsys, caplog)
    assert str(good) in written and (str(image) in written) == (outcome == "kept")


def test_pretrain_missing_input(tmp_path, bad, capsys, caplog):
    good = bad.good(tmp_path / "in" / "good.nii.gz")
    gone = tmp_path / "gone.nii.gz"
    datalist = tmp_path / "pretrain.json"
    code = main(["pretrain", str(good), str(gone), "-o", str(datalist), "--no-progress"])
    check_batch(code, datalist, gone, "no such file or folder", capsys, caplog)


@pytest.mark.parametrize("kind", list(FINETUNE))
def test_finetune_kind(kind, tmp_path, bad, capsys, caplog):
    outcome, words = FINETUNE[kind]
    images, labels = tmp_path / "images", tmp_path / "labels"
    for i in range(3):
        bad.good(images / f"case{i}.nii.gz", seed=i)
        bad.save(labels / f"case{i}.nii.gz", bad.box_label())
    if kind in bad.LABEL_KINDS:
        image, label = bad.good(images / "bad.nii.gz"), bad.LABEL_KINDS[kind](labels / "bad.nii.gz")
        at_fault = label
    else:
        shape = bad.SMALL_SHAPE if kind == "smaller_than_crop" else bad.SHAPE
        image = bad.IMAGE_KINDS[kind](images / "bad.nii.gz")
        label = bad.save(labels / "bad.nii.gz", bad.box_label(shape))
        at_fault = image
    datalist = tmp_path / "dataset.json"
    code = main(["finetune", "--images", str(images), "--labels", str(labels), "-o", str(datalist), "--no-progress"])
    written = check_batch(code, datalist, at_fault if outcome == "skipped" else None, words, capsys, caplog)
    assert (str(image) in written) == (outcome == "kept")
    if outcome == "skipped":
        assert "case bad:" in skipped_rows(datalist)[0]["reason"]
        if kind in bad.LABEL_KINDS:  # a grid problem names the image too
            assert str(image) in skipped_rows(datalist)[0]["reason"]


def test_finetune_image_without_a_label(tmp_path, bad, capsys, caplog):
    for i in range(3):
        bad.good(tmp_path / "images" / f"case{i}.nii.gz", seed=i)
        bad.save(tmp_path / "labels" / f"case{i}.nii.gz", bad.box_label())
    bad.good(tmp_path / "images" / "orphan.nii.gz")
    datalist = tmp_path / "dataset.json"
    code = main(["finetune", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"),
                 "-o", str(datalist), "--no-progress"])
    check_batch(code, datalist, "orphan", "no label found (looked for 'orphan'", capsys, caplog)


def test_validate_a_datalist_pointing_to_a_missing_file(tmp_path, bad, user_error):
    gone = tmp_path / "gone.nii.gz"
    datalist = bad.write_json(tmp_path / "pretrain.json", [{"image": str(bad.good(tmp_path / "a.nii.gz"))},
                                                          {"image": str(gone)}])
    line = user_error(main(["validate", str(datalist), "--no-progress"]), datalist, gone)
    assert "[1]" in line and "file not found" in line, line
