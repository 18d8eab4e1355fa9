"""Segmentation finetuning (``dinov2.eval.segmentation.finetune.main``) against every kind of bad input (issue #14).

A tiny preset (2 classes, 16^3 crop, 1 mm, one modality) written as a YAML file and passed with
``--dataset-name``; the datalist has one good training case, the case under test, and one good
validation case. The pre-flight reads every image and label map before the model is built; a
bad file ends the run with one ``ERROR:`` line naming the datalist and the file (and, for a label
map off its image's grid, the image too), exit code 1, no traceback, and no ``best_model.pth``,
``last_checkpoint.pth`` or ``results.json``. The matrix:

==============================  ================================================================
kind                            outcome
==============================  ================================================================
empty                           error: the file is empty
truncated_gzip                  error: truncated
random_bytes                    error: not gzip-compressed
2d                              error: 2D volume
4d                              error: a 4D series for a one-channel model (split it into 3D)
5d                              error: 5D volume
all_nan                         error: no finite voxel
some_inf (partial +-Inf)        tolerated: kept, one warning naming the file
smaller_than_crop (6^3)         tolerated: kept (padded to the crop); trained on below
label_shape_mismatch            error naming the label map and its image
label_affine_mismatch           error naming the label map and its image: affine
label_values_outside_classes    error naming the label map: the value and the preset's classes
datalist not JSON               error naming the datalist
datalist missing keys           error naming the datalist: a training entry without 'label'
datalist -> missing file        error naming the file: file not found
checkpoint missing              error naming the file
checkpoint text                 error naming the file: a text file
checkpoint other architecture   error naming the file: a 2D ViT (its tokens are not a cube)
==============================  ================================================================

Tolerated kinds stop right after the pre-flight; one end-to-end run of one iteration with
``--skip-bad-inputs`` trains on a 6^3 case and a case with +-Inf voxels while it leaves a truncated
image out and lists it in ``skipped.tsv``.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dinov2.eval.presets import load_preset
from dinov2.eval.segmentation import finetune, train_loop

RUN_OUTPUTS = ("best_model.pth", "last_checkpoint.pth", "results.json", "skipped.tsv")

IMAGES = {
    "empty": ("error", "the file is empty (0 bytes)"),
    "truncated_gzip": ("error", "truncated"),
    "random_bytes": ("error", "not gzip-compressed"),
    "2d": ("error", "2D volume"),
    "4d": ("error", "4D series of 3 frames"),
    "5d": ("error", "5D volume"),
    "all_nan": ("error", "no finite voxel"),
    "some_inf": ("warn", "3 of 4096 voxels are NaN or +-Inf"),
    "smaller_than_crop": ("kept", None),
}
LABELS = {
    "label_shape_mismatch": "spatial shape [16, 16, 12] != [16, 16, 16]",
    "label_affine_mismatch": "affine differs",
    "label_values_outside_classes": "value(s) 7 that are not classes of this task (classes: 0 background, 1 bright)",
}
DATALISTS = {
    "not_json": "is not valid JSON",
    "missing_keys": "training[1].label: entry has no 'label'",
    "missing_file": "file not found",
}
CHECKPOINTS = {
    "missing": "Checkpoint file not found",
    "text": "it is a text file",
    "other_architecture": "pos_embed covers 256 patches, not a cube",
}


@pytest.fixture(scope="module")
def preset_file(tmp_path_factory) -> Path:
    """A tiny 2-class preset at 1 mm with a 16^3 crop, as the YAML file --dataset-name takes."""
    raw = OmegaConf.to_container(load_preset("brain_tissue"))
    raw.update(name="tiny_bright_box", classes=["background", "bright"], image_size=[16, 16, 16],
               spacing=[1.0, 1.0, 1.0], intensity={"mode": "percentile", "lower": 0, "upper": 100},
               datalist="dataset.json", sample_command=None)
    path = tmp_path_factory.mktemp("preset") / "tiny_bright_box.yaml"
    OmegaConf.save(OmegaConf.create(raw), path)
    return path


def run_argv(preset_file: Path, base: Path, *extra: str, weights: str = "none") -> list[str]:
    return ["--pretrained-weights", str(weights), "--dataset-name", str(preset_file), "--base-data-dir", str(base),
            "--output-dir", str(base / "run"), "--segmentation-head", "UNETR", "--epochs", "1", "--epoch-length", "1",
            "--eval-iters", "1", "--batch-size", "1", "--num-workers", "0", "--device", "cpu", *extra,
            "model.arch=vit_tiny_3d", "model.backbone_kwargs={embed_dim: 32, depth: 4, num_heads: 2, patch_size: 8}",
            "model.unetr.feature_size=4"]


def case(bad, folder: Path, name: str, seed: int = 0, image=None, label=None) -> dict:
    """A datalist entry: a good 16^3 image and its box label map, unless given."""
    image = image if image is not None else bad.good(folder / f"{name}.nii.gz", seed)
    label = label if label is not None else bad.save(folder / f"{name}_seg.nii.gz", bad.box_label())
    return {"image": str(image), "label": str(label)}


def dataset(bad, base: Path, *training: dict) -> Path:
    """``dataset.json``: a good training case, then ``training``; one good validation case."""
    return bad.write_json(base / "dataset.json", {"training": [case(bad, base, "a", 1), *training],
                                                  "validation": [case(bad, base, "v", 2)]})


@pytest.fixture()
def stop_after_preflight(monkeypatch, bad):
    """Run only up to the pre-flight (``load_splits``): the splits it kept, then :class:`PreflightPassed`."""
    kept: dict = {}
    original = train_loop.load_splits

    def checked_then_stop(*args, **kwargs):
        kept.update(original(*args, **kwargs))
        raise bad.PreflightPassed

    monkeypatch.setattr(train_loop, "load_splits", checked_then_stop)
    return kept


def test_the_tables_cover_every_kind(bad):
    assert set(IMAGES) == set(bad.IMAGE_KINDS) and set(LABELS) == set(bad.LABEL_KINDS)


@pytest.mark.parametrize("kind", list(IMAGES))
def test_image_kind(kind, tmp_path, bad, preset_file, user_error, caplog, capsys, request):
    outcome, words = IMAGES[kind]
    image = bad.IMAGE_KINDS[kind](tmp_path / f"{kind}.nii.gz")
    shape = bad.SMALL_SHAPE if kind == "smaller_than_crop" else bad.SHAPE
    label = bad.save(tmp_path / f"{kind}_seg.nii.gz", bad.box_label(shape))
    datalist = dataset(bad, tmp_path, {"image": str(image), "label": str(label)})
    if outcome == "error":
        line = user_error(finetune.main(run_argv(preset_file, tmp_path)), datalist, image, "training[1].image",
                          "--skip-bad-inputs", outputs_in=(tmp_path / "run", RUN_OUTPUTS))
        assert words in line and str(tmp_path / "a.nii.gz") not in line, line
        return
    request.getfixturevalue("fresh_nonfinite_warnings")
    kept = request.getfixturevalue("stop_after_preflight")
    with pytest.raises(bad.PreflightPassed):
        finetune.main(run_argv(preset_file, tmp_path))
    assert [e["image"] for e in kept["training"]][-1] == str(image)
    assert "ERROR" not in capsys.readouterr().err
    warned = bad.warnings_naming(caplog, image)
    assert len(warned) == (1 if outcome == "warn" else 0), warned
    if words:
        assert words in warned[0]


@pytest.mark.parametrize("kind", list(LABELS))
def test_label_kind(kind, tmp_path, bad, preset_file, user_error):
    image = bad.good(tmp_path / "b.nii.gz")
    label = bad.LABEL_KINDS[kind](tmp_path / "b_seg.nii.gz")
    datalist = dataset(bad, tmp_path, {"image": str(image), "label": str(label)})
    grid = kind != "label_values_outside_classes"  # a grid problem names the image as well
    line = user_error(finetune.main(run_argv(preset_file, tmp_path)), datalist, label, "training[1].label",
                      *([image] if grid else []), outputs_in=(tmp_path / "run", RUN_OUTPUTS))
    assert LABELS[kind] in line, line


@pytest.mark.parametrize("kind", list(DATALISTS))
def test_datalist_kind(kind, tmp_path, bad, preset_file, user_error):
    named = []
    if kind == "not_json":
        datalist = bad.not_json(tmp_path / "dataset.json")
    elif kind == "missing_keys":
        datalist = dataset(bad, tmp_path, {"image": str(bad.good(tmp_path / "b.nii.gz"))})
    else:
        named = [tmp_path / "gone.nii.gz"]
        datalist = dataset(bad, tmp_path, case(bad, tmp_path, "b", image=named[0]))
    line = user_error(finetune.main(run_argv(preset_file, tmp_path)), datalist, *named,
                      outputs_in=(tmp_path / "run", RUN_OUTPUTS))
    assert DATALISTS[kind] in line, line


@pytest.mark.parametrize("kind", list(CHECKPOINTS))
def test_checkpoint_kind(kind, tmp_path, bad, preset_file, user_error):
    weights = {"missing": lambda p: p, "text": bad.text_file, "other_architecture": bad.vit_2d_checkpoint}[kind](
        tmp_path / "weights" / "teacher_checkpoint.pth")
    dataset(bad, tmp_path)
    line = user_error(finetune.main(run_argv(preset_file, tmp_path, weights=weights)), weights,
                      outputs_in=(tmp_path / "run", RUN_OUTPUTS))
    assert CHECKPOINTS[kind] in line, line


def test_skip_bad_inputs_trains_on_the_others_and_lists_the_skipped(tmp_path, bad, preset_file, caplog, capsys):
    """One iteration on a 6^3 case (padded to the 16^3 crop) and a +-Inf case; the truncated image left out."""
    cut = bad.truncated(tmp_path / "cut.nii.gz")
    small = case(bad, tmp_path, "small", image=bad.small(tmp_path / "small.nii.gz"),
                 label=bad.save(tmp_path / "small_seg.nii.gz", bad.box_label(bad.SMALL_SHAPE)))
    inf = case(bad, tmp_path, "inf", image=bad.some_inf(tmp_path / "inf.nii.gz"))
    dataset(bad, tmp_path, case(bad, tmp_path, "cut", image=cut), small, inf)
    run = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="dinov2")
    assert finetune.main(run_argv(preset_file, tmp_path, "--skip-bad-inputs", "--epoch-length", "3")) == 0
    assert "ERROR" not in capsys.readouterr().err and "Traceback" not in caplog.text
    with open(run / "skipped.tsv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [(r["path"], r["where"]) for r in rows] == [(str(cut), "training[1].image")]
    assert "truncated" in rows[0]["reason"]
    assert f"Skipped training[1].image {cut}" in caplog.text and "1 of 5 entries left out" in caplog.text
    assert ": 3 training, 1 validation, 0 test cases" in caplog.text  # the 6^3 and +-Inf cases trained on
    assert bad.outputs(run, RUN_OUTPUTS) == sorted(RUN_OUTPUTS)
