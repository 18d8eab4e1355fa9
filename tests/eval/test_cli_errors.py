"""The evaluation commands (segmentation finetuning and prediction, linear probing, visualisation,
evidence): a missing file or a bad flag value is one ``ERROR:`` line on stderr naming it, exit
code 1, no traceback; ``--debug`` raises the error with its traceback instead."""

from __future__ import annotations

import pytest

from dinov2.eval.evidence.__main__ import main as evidence_main
from dinov2.eval.linear import run as linear_run
from dinov2.eval.segmentation import finetune, predict
from dinov2.eval.visualisation import run as vis_run
from dinov2.utils.config import ConfigError


def _check(main, argv, needle, error_line, raises=Exception):
    """``main(argv)``: exit 1 and one ERROR line holding ``needle``; with --debug, ``raises``
    (the error itself, which a process prints with its traceback)."""
    assert main([str(a) for a in argv]) == 1
    assert needle in error_line(only=True)
    with pytest.raises(raises, match=needle.replace(".", r"\.").replace("[", r"\[")):
        main([str(a) for a in argv] + ["--debug"])


# -------------------------------------------------------------------- python -m dinov2.eval.segmentation
def test_finetune_missing_config_file(tmp_path, monkeypatch, error_line):
    monkeypatch.chdir(tmp_path)
    _check(finetune.main, ["--config-file", "missing.yaml", "--pretrained-weights", "none", "--output-dir", "o",
                           "--dataset-name", "brain_tissue", "--base-data-dir", "."], "missing.yaml", error_line,
           FileNotFoundError)


def test_finetune_bad_values(tmp_path, error_line):
    base = ["--pretrained-weights", "none", "--output-dir", tmp_path / "o", "--base-data-dir", tmp_path]
    _check(finetune.main, [*base, "--dataset-name", "no_such_dataset"], "no_such_dataset", error_line)
    _check(finetune.main, [*base, "--dataset-name", "brain_tissue", "model.hed=UNETR"], "model.hed", error_line,
           ConfigError)


# ----------------------------------------------------------- python -m dinov2.eval.segmentation.predict
def test_predict_missing_input_and_bad_frame(tmp_path, error_line):
    base = ["--checkpoint", tmp_path / "best_model.pth", "--output", tmp_path / "out"]
    _check(predict.main, [*base, "--input", tmp_path / "missing.nii.gz"], "missing.nii.gz", error_line,
           FileNotFoundError)
    _check(predict.main, [*base, "--input", tmp_path, "--frame", "-1"], "--frame -1", error_line, ValueError)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind, content, needle", [
    ("missing", None, "Checkpoint file not found"),
    ("text", b"not a checkpoint\n", "it is a text file"),
    ("random bytes", bytes(range(256)) * 4, "is not a PyTorch checkpoint"),
    ("truncated", None, "is not a PyTorch checkpoint"),
])
def test_predict_checkpoint_that_is_not_a_finetuned_model(kind, content, needle, tmp_path, error_line):
    import shutil

    import nibabel as nib
    import numpy as np
    import torch

    checkpoint = tmp_path / "best_model.pth"
    if content is not None:
        checkpoint.write_bytes(content)
    elif kind == "truncated":
        torch.save({"format": "x", "model": {"w": torch.zeros(1000)}}, checkpoint)
        checkpoint.write_bytes(checkpoint.read_bytes()[:200])
    scans = tmp_path / "scans"
    scans.mkdir()
    nib.save(nib.Nifti1Image(np.random.rand(16, 16, 16).astype("float32"), np.eye(4)), scans / "a.nii.gz")
    assert predict.main([*map(str, ["--checkpoint", checkpoint, "--input", scans, "--output", tmp_path / "out"])]) == 1
    line = error_line()
    assert str(checkpoint) in line and needle in line and "--checkpoint" in line
    assert not list((tmp_path / "out").glob("*.nii.gz")) if (tmp_path / "out").exists() else True
    shutil.rmtree(scans)


# ---------------------------------------------------------------------- python -m dinov2.eval.linear
def test_linear_missing_datalist_and_bad_value(tmp_path, error_line):
    base = ["--pretrained-weights", "none", "--arch", "vit_tiny_3d", "--output-dir", tmp_path / "o"]
    _check(linear_run.main, [*base, "--dataset-name", "brain_lobes", "--datalist", tmp_path / "missing.json"],
           "missing.json", error_line, FileNotFoundError)
    _check(linear_run.main, [*base, "--dataset-name", "no_such_dataset"], "no_such_dataset", error_line)


# ---------------------------------------------------------------- python -m dinov2.eval.visualisation
def test_visualisation_missing_image_and_bad_image_size(tmp_path, error_line):
    base = ["--pretrained-weights", "none", "--arch", "vit_tiny_3d", "--output-dir", tmp_path / "o",
            "--image-path", tmp_path / "missing.nii.gz"]
    _check(vis_run.main, base, "missing.nii.gz", error_line)
    _check(vis_run.main, [*base, "--image-size", "1", "2"], "--image-size takes 1 or 3 ints", error_line, ValueError)


# --------------------------------------------------------------------- python -m dinov2.eval.evidence
def test_evidence_missing_teacher_and_bad_folds(tmp_path, error_line):
    from dinov2.eval.evidence.errors import EvidenceError

    teacher = tmp_path / "teacher_checkpoint.pth"
    _check(evidence_main, ["--teacher", teacher], str(teacher), error_line)
    _check(evidence_main, ["--teacher", teacher, "--cv-folds", "1"], "--cv-folds", error_line, EvidenceError)
    # the same --device flag and check as every other command (dinov2.utils.device)
    _check(evidence_main, ["--teacher", teacher, "--device", "cuda:99"], "--device=cuda:99", error_line)
