"""Linear probing (``dinov2.eval.linear.run.main``) against every kind of bad input (issue #14).

The ``brain_lobes`` preset (5 classes, 16^3 input) with ``--datalist`` pointing at a tiny
datalist: four good training volumes, the entry under test, two good validation volumes; a
random-init ``vit_tiny_3d`` (patch 8). Labels are class indices, so the label-map kinds do not
apply; their counterpart is a class index outside the preset's classes. The pre-flight reads
every image before the backbone is built; a bad file ends the run with one ``ERROR:`` line naming
the datalist and the file, exit code 1, no traceback, and no ``results.json``,
``best_classifier.pth``, ``metrics.jsonl`` or feature cache. The matrix:

==============================  ================================================================
kind                            outcome
==============================  ================================================================
empty                           error: the file is empty
truncated_gzip                  error: truncated
random_bytes                    error: not gzip-compressed
2d                              error: 2D volume
4d                              tolerated: the probe takes the first frame, one warning naming it
5d                              error: 5D volume
all_nan                         error: no finite voxel
some_inf (partial +-Inf)        tolerated: one warning naming the file
smaller_than_crop (6^3)         tolerated: resized to the 16^3 input
label shape / affine mismatch   n/a (a label is a class index, not a map)
class index >= num_classes      XFAIL: the error names neither the datalist nor the entry
negative class index            error naming the datalist and the entry
datalist not JSON               error naming the datalist
datalist missing keys           error naming the datalist: a training entry without 'label'
datalist -> missing file        error naming the file: file not found
checkpoint missing              error naming the file
checkpoint text                 error naming the file: a text file
checkpoint other architecture   error naming the file: a 2D ViT (its tokens are not a cube)
==============================  ================================================================

The tolerated kinds run the whole (sub-second) probe; ``--skip-bad-inputs`` is run end to end
with a truncated file among them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dinov2.eval.linear import run as linear_run

RUN_OUTPUTS = ("results.json", "best_classifier.pth", "metrics.jsonl", "*.pt", "skipped.tsv")

IMAGES = {
    "empty": ("error", "the file is empty (0 bytes)"),
    "truncated_gzip": ("error", "truncated"),
    "random_bytes": ("error", "not gzip-compressed"),
    "2d": ("error", "2D volume"),
    "4d": ("warn", "has 3 frames; the single-channel backbone sees its first frame"),
    "5d": ("error", "5D volume"),
    "all_nan": ("error", "no finite voxel"),
    "some_inf": ("warn", "3 of 4096 voxels are NaN or +-Inf"),
    "smaller_than_crop": ("kept", None),
}
CLASS_INDICES = {
    "class_index_outside_classes": (7, "training[4].label"),
    "negative_class_index": (-1, "training[4].label: class index -1 is negative"),
}
DATALISTS = {
    "not_json": "is not valid JSON",
    "missing_keys": "training[4].label: entry has no 'label'",
    "missing_file": "file not found",
}
CHECKPOINTS = {
    "missing": "Checkpoint file not found",
    "text": "it is a text file",
    "other_architecture": "pos_embed covers 256 patches, not a cube",
}


def run_argv(datalist: Path, out: Path, *extra: str, weights: str = "none") -> list[str]:
    random_init = ["--arch", "vit_tiny_3d"] if weights == "none" else []
    return ["--pretrained-weights", str(weights), *random_init, "--dataset-name", "brain_lobes",
            "--datalist", str(datalist), "--output-dir", str(out), "--image-size", "16", "--epochs", "1",
            "--learning-rates", "0.1", "--device", "cpu", *extra, "model.backbone_kwargs.patch_size=8"]


def datalist_with(bad, folder: Path, *entries: dict) -> Path:
    """Four good training volumes (classes 0, 1), then ``entries``; two good validation volumes."""
    training = [{"image": str(bad.good(folder / f"t{i}.nii.gz", seed=i)), "label": i % 2} for i in range(4)]
    validation = [{"image": str(bad.good(folder / f"v{i}.nii.gz", seed=10 + i)), "label": i % 2} for i in range(2)]
    return bad.write_json(folder / "datalist.json", {"training": [*training, *entries], "validation": validation})


def test_the_table_covers_every_image_kind(bad):
    assert set(IMAGES) == set(bad.IMAGE_KINDS)


@pytest.mark.parametrize("kind", list(IMAGES))
def test_image_kind(kind, tmp_path, bad, user_error, caplog, capsys, fresh_nonfinite_warnings):
    outcome, words = IMAGES[kind]
    image = bad.IMAGE_KINDS[kind](tmp_path / f"{kind}.nii.gz")
    datalist = datalist_with(bad, tmp_path, {"image": str(image), "label": 1})
    out = tmp_path / "out"
    code = linear_run.main(run_argv(datalist, out))
    if outcome == "error":
        line = user_error(code, datalist, image, "training[4].image", "--skip-bad-inputs",
                          outputs_in=(out, RUN_OUTPUTS))
        assert words in line and "t0.nii.gz" not in line, line
        return
    assert code == 0 and "Traceback" not in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["dataset"]["sizes"]["training"] == 5
    warned = bad.warnings_naming(caplog, image)
    assert len(warned) == (1 if outcome == "warn" else 0), warned
    if words:
        assert words in warned[0]


@pytest.mark.parametrize("kind", [
    "class_index_outside_classes",
    "negative_class_index",
])
def test_class_index_kind(kind, tmp_path, bad, user_error):
    value, words = CLASS_INDICES[kind]
    datalist = datalist_with(bad, tmp_path, {"image": str(bad.good(tmp_path / "b.nii.gz")), "label": value})
    out = tmp_path / "out"
    line = user_error(linear_run.main(run_argv(datalist, out)), outputs_in=(out, RUN_OUTPUTS))
    assert words in line, line
    assert str(datalist) in line and "training[4]" in line, line


@pytest.mark.parametrize("kind", list(DATALISTS))
def test_datalist_kind(kind, tmp_path, bad, user_error):
    named = []
    if kind == "not_json":
        datalist = bad.not_json(tmp_path / "datalist.json")
    elif kind == "missing_keys":
        datalist = datalist_with(bad, tmp_path, {"image": str(bad.good(tmp_path / "b.nii.gz"))})
    else:
        named = [tmp_path / "gone.nii.gz"]
        datalist = datalist_with(bad, tmp_path, {"image": str(named[0]), "label": 0})
    out = tmp_path / "out"
    line = user_error(linear_run.main(run_argv(datalist, out)), datalist, *named, outputs_in=(out, RUN_OUTPUTS))
    assert DATALISTS[kind] in line, line


@pytest.mark.parametrize("kind", list(CHECKPOINTS))
def test_checkpoint_kind(kind, tmp_path, bad, user_error):
    weights = {"missing": lambda p: p, "text": bad.text_file, "other_architecture": bad.vit_2d_checkpoint}[kind](
        tmp_path / "weights" / "teacher_checkpoint.pth")
    datalist = datalist_with(bad, tmp_path)
    out = tmp_path / "out"
    line = user_error(linear_run.main(run_argv(datalist, out, weights=weights)), weights, outputs_in=(out, RUN_OUTPUTS))
    assert CHECKPOINTS[kind] in line, line


def test_skip_bad_inputs_probes_the_others_and_lists_the_skipped(tmp_path, bad, caplog, capsys):
    cut = bad.truncated(tmp_path / "cut.nii.gz")
    tolerated = [bad.small(tmp_path / "small.nii.gz"), bad.four_d(tmp_path / "series.nii.gz"),
                 bad.some_inf(tmp_path / "inf.nii.gz")]
    datalist = datalist_with(bad, tmp_path, *({"image": str(p), "label": 1} for p in [cut, *tolerated]))
    out = tmp_path / "out"
    assert linear_run.main(run_argv(datalist, out, "--skip-bad-inputs")) == 0
    assert "ERROR" not in capsys.readouterr().err and "Traceback" not in caplog.text
    with open(out / "skipped.tsv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [(r["path"], r["where"]) for r in rows] == [(str(cut), "training[4].image")]
    assert "truncated" in rows[0]["reason"] and f"Skipped training[4].image {cut}" in caplog.text
    assert json.loads((out / "results.json").read_text())["dataset"]["sizes"] == {
        "training": 7, "validation": 2, "test": 0}
