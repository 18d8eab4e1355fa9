"""Segmentation prediction (``dinov2.eval.segmentation.predict.main``): the bad-input kinds not
tested elsewhere (issue #14).

Prediction is a batch command: a bad case is skipped with one log line naming its file, listed in
``<output>/skipped.tsv``, leaves no ``<case>_seg.nii.gz``, and makes the exit code 1; a bad
``--input`` datalist or ``--checkpoint`` is one ``ERROR:`` line naming it. The matrix (where the
other rows are tested):

==============================  ================================================================
kind                            outcome
==============================  ================================================================
empty, truncated_gzip,          skipped, one line naming the file (tests/eval/
random_bytes, 2d, 5d, all_nan   test_segmentation_inputs.py::test_predict_skips_a_bad_input_...)
4d                              skipped without ``--frame``, predicted with it (same file)
some_inf (partial +-Inf)        predicted, one warning naming the file (same file)
smaller_than_window (6^3)       predicted on the input's 6^3 grid (here)
label kinds                     n/a (prediction reads no label map)
datalist not JSON               error naming the datalist (here; fixed in predict.py)
datalist missing keys           error naming the datalist and the entry (here; it was a KeyError
                                traceback)
datalist -> missing file        skipped, one line naming the file (here)
checkpoint missing / text /     error naming the file (tests/eval/test_cli_errors.py::
random bytes / truncated        test_predict_checkpoint_that_is_not_a_finetuned_model)
checkpoint other architecture   error naming the file: a pretraining teacher export, a 2D ViT (here)
==============================  ================================================================
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dinov2.eval.segmentation import predict

PREDICTIONS = ("*_seg.nii.gz", "*_seg.png", "skipped.tsv")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """best_model.pth of a tiny random UNETR (1 channel, 2 classes, 16^3 window, 1 mm)."""
    from dinov2.checkpoints.finetuned import save_finetuned
    from dinov2.eval.presets import DatasetPreset, load_preset
    from dinov2.eval.segmentation.model import build_segmentation_model
    from dinov2.models import build_model

    raw = OmegaConf.to_container(load_preset("brain_tissue"))
    raw.update(name="tiny_bright_box", classes=["background", "bright"], image_size=[16, 16, 16],
               spacing=[1.0, 1.0, 1.0], intensity={"mode": "percentile", "lower": 0, "upper": 100})
    torch.manual_seed(0)
    kwargs = {"embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 8, "img_size": 16}
    model = build_segmentation_model(build_model("vit_tiny_3d", **kwargs), "UNETR", 1, 2, {"feature_size": 4})
    config = {"model": {"unetr": {"feature_size": 4}}, "evaluation": {"overlap": 0.25}}
    return save_finetuned(tmp_path_factory.mktemp("ckpt") / "best_model.pth", model,
                          {"arch": "vit_tiny_3d", "kwargs": kwargs}, config, DatasetPreset.from_config(raw), 1,
                          {"name": "x", "value": 0.5})


def run(checkpoint: Path, inputs, out: Path) -> int:
    return predict.main(["--checkpoint", str(checkpoint), "--input", str(inputs), "--output", str(out),
                         "--device", "cpu", "--no-preview"])


def test_a_volume_smaller_than_the_window_is_predicted_on_its_own_grid(checkpoint, tmp_path, bad, capsys):
    image = bad.small(tmp_path / "in" / "small.nii.gz")
    out = tmp_path / "out"
    assert run(checkpoint, image, out) == 0
    assert "Traceback" not in capsys.readouterr().err
    written = nib.load(out / "small_seg.nii.gz")
    assert written.shape == bad.SMALL_SHAPE and np.allclose(written.affine, np.eye(4))
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}
    assert not (out / "skipped.tsv").exists()


DATALISTS = {
    "not_json": "is not a valid JSON datalist (line 2",
    "missing_keys": "entry test[1] has no 'image' path",
}


@pytest.mark.parametrize("kind", list(DATALISTS))
def test_datalist_kind_is_one_error_naming_it(kind, checkpoint, tmp_path, bad, user_error):
    if kind == "not_json":
        datalist = bad.not_json(tmp_path / "dataset.json")
    else:
        good = bad.good(tmp_path / "a.nii.gz")
        datalist = bad.write_json(tmp_path / "dataset.json", {"test": [{"image": str(good)}, {"img": str(good)}]})
    out = tmp_path / "out"
    line = user_error(run(checkpoint, datalist, out), datalist, outputs_in=(out, PREDICTIONS))
    assert DATALISTS[kind] in line, line


def test_datalist_pointing_to_a_missing_file_skips_that_case(checkpoint, tmp_path, bad, capsys, caplog):
    good, gone = bad.good(tmp_path / "a.nii.gz"), tmp_path / "gone.nii.gz"
    datalist = bad.write_json(tmp_path / "dataset.json", {"test": [{"image": str(gone)}, {"image": str(good)}]})
    out = tmp_path / "out"
    assert run(checkpoint, datalist, out) == 1
    assert "Traceback" not in capsys.readouterr().err + caplog.text
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and str(gone) in r.getMessage()]
    assert len(lines) == 1 and "does not exist" in lines[0], lines
    with open(out / "skipped.tsv", newline="", encoding="utf-8") as handle:
        assert [row["path"] for row in csv.DictReader(handle, delimiter="\t")] == [str(gone)]
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.nii.gz", "skipped.tsv"]


@pytest.mark.parametrize("kind", ["teacher_export", "vit_2d"])
def test_checkpoint_of_another_architecture_is_one_error_naming_it(kind, checkpoint, tmp_path, bad, user_error):
    if kind == "teacher_export":
        from dinov2.checkpoints.teacher_export import save_teacher_checkpoint
        from dinov2.models import build_model

        backbone = build_model("vit_tiny_3d", patch_size=8, img_size=16).state_dict()
        weights = save_teacher_checkpoint(tmp_path / "teacher_checkpoint.pth",
                                          {f"backbone.{k}": v for k, v in backbone.items()},
                                          {"student": {"arch": "vit_tiny_3d", "patch_size": 8}}, 0)
    else:
        weights = bad.vit_2d_checkpoint(tmp_path / "vit_s14.pth")
    out = tmp_path / "out"
    line = user_error(run(weights, bad.good(tmp_path / "in" / "a.nii.gz"), out), weights,
                      outputs_in=(out, PREDICTIONS))
    assert "is not a finetuned segmentation checkpoint" in line, line
