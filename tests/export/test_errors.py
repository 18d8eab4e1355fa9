"""User errors of export and of ``predict --model``: exit code 1, one ERROR line naming the file, no output."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from dinov2.eval.segmentation import predict
from dinov2.export import INSTALL_HINT
from dinov2.export import onnx_export
from dinov2.export.__main__ import main as export_main

pytestmark = pytest.mark.usefixtures("one_thread")


def export(checkpoint, output, *extra: str) -> int:
    return export_main(["--checkpoint", str(checkpoint), "--format", "onnx", "--output", str(output), *extra])


def predict_onnx(model, volume, out: Path, *extra: str) -> int:
    return predict.main(["--model", str(model), "--input", str(volume), "--output", str(out), "--device", "cpu",
                         "--no-preview", *extra])


def nothing_written(folder: Path) -> bool:
    """No output and no temporary file (hidden names included)."""
    return not folder.exists() or not any(folder.iterdir())


def garbage(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    return path


# ----------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("make,words", [
    (lambda d: d / "missing.pth", "not found"),
    (lambda d: garbage(d / "noise.pth"), "not a PyTorch checkpoint"),
    (lambda d: d, "is not a file"),
])
def test_export_of_a_missing_or_garbage_checkpoint(make, words, tmp_path, error_line):
    checkpoint = make(tmp_path)
    assert export(checkpoint, tmp_path / "out" / "model.onnx") == 1
    line = error_line(only=True)
    assert str(checkpoint) in line and words in line, line
    assert nothing_written(tmp_path / "out")


def test_unknown_format_is_one_error_line(finetuned, tmp_path, error_line):
    code = export_main(["--checkpoint", str(finetuned["UNETR"]), "--format", "tflite", "--output",
                        str(tmp_path / "model.onnx")])
    assert code == 1
    line = error_line(only=True)
    assert "--format" in line and "tflite" in line, line
    assert nothing_written(tmp_path)


def test_unwritable_output_folder(finetuned, tmp_path, error_line):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    output = blocker / "model.onnx"  # its folder cannot exist (even for root, who may write anywhere)
    assert export(finetuned["UNETR"], output) == 1
    line = error_line(only=True)
    assert str(blocker) in line and "cannot write" in line, line
    assert blocker.read_text() == "not a folder"


def test_output_must_be_an_onnx_file_name(finetuned, tmp_path, error_line):
    assert export(finetuned["UNETR"], tmp_path / "best_model.pth") == 1
    assert ".onnx suffix" in error_line(only=True)
    assert nothing_written(tmp_path)


def test_a_head_that_cannot_be_exported_fails_with_one_line(finetuned, tmp_path, monkeypatch, error_line):
    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator foo\nmore details")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    out = tmp_path / "out"
    assert export(finetuned["Linear"], out / "model.onnx") == 1
    line = error_line(only=True)
    assert "Linear segmenter cannot be exported to ONNX" in line and "operator foo" in line, line
    assert "nothing was written" in line and nothing_written(out)


def test_an_export_that_differs_from_pytorch_is_not_written(finetuned, tmp_path, monkeypatch, error_line):
    """Traced with free spatial axes, the adapter's graph keeps its training sizes: verification catches it."""
    plan_of = onnx_export.segmentation_plan

    def size_free(path):
        plan = plan_of(path)
        plan.dynamic_spatial, plan.spatial_multiple = True, 16  # the adapter's sides: multiples of 2 patches
        return plan

    monkeypatch.setattr(onnx_export, "segmentation_plan", size_free)
    out = tmp_path / "out"
    assert export(finetuned["ViTAdapterUNETR"], out / "model.onnx") == 1
    line = error_line(only=True)
    assert "ViTAdapterUNETR segmenter" in line and "[1, 1, 32, 16, 48]" in line and "nothing was written" in line, line
    assert nothing_written(out)


@pytest.mark.parametrize("module", ["onnx", "onnxruntime"])
def test_missing_export_extra_names_the_install_command(module, finetuned, tmp_path, monkeypatch, error_line):
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    assert export(finetuned["UNETR"], tmp_path / "out" / "model.onnx") == 1
    line = error_line(only=True)
    assert INSTALL_HINT in line and f"'{module}'" in line, line
    assert nothing_written(tmp_path / "out")


# ------------------------------------------------------------------------------------ predict --model
def backbone_onnx(teacher, folder: Path) -> Path:
    assert export(teacher, folder / "vit.onnx") == 0
    return folder / "vit.onnx"


def without_metadata(exported, folder: Path) -> Path:
    model = onnx.load(str(exported["Linear"]))
    del model.metadata_props[:]
    onnx.save(model, str(folder / "plain.onnx"))
    return folder / "plain.onnx"


@pytest.mark.parametrize("make,words", [
    (lambda ex, te, d: d / "missing.onnx", "not found"),
    (lambda ex, te, d: garbage(d / "noise.onnx"), "not an ONNX model"),
    (lambda ex, te, d: without_metadata(ex, d), "without dinov2 metadata"),
    (lambda ex, te, d: backbone_onnx(te, d), "exported backbone"),
])
def test_predict_with_an_unusable_onnx_file(make, words, exported, teacher, real_volume, tmp_path, error_line):
    model = make(exported, teacher, tmp_path)
    assert predict_onnx(model, real_volume, tmp_path / "preds") == 1
    line = error_line()
    assert str(model) in line and words in line, line
    assert nothing_written(tmp_path / "preds")


@pytest.mark.parametrize("flags", [[], ["--checkpoint", "best_model.pth", "--model", "model.onnx"]])
def test_predict_takes_exactly_one_of_checkpoint_and_model(flags, real_volume, tmp_path, error_line):
    assert predict.main([*flags, "--input", str(real_volume), "--output", str(tmp_path / "preds")]) == 1
    line = error_line(only=True)
    assert "--checkpoint" in line and "--model" in line, line
    assert nothing_written(tmp_path / "preds")


def test_predict_model_without_onnxruntime_names_the_install_command(exported, real_volume, tmp_path, monkeypatch,
                                                                      error_line):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert predict_onnx(exported["UNETR"], real_volume, tmp_path / "preds") == 1
    assert INSTALL_HINT in error_line()
    assert nothing_written(tmp_path / "preds")
