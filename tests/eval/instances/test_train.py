"""``python -m dinov2.eval.instances train`` end to end on generated stacks of touching balls."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dinov2.eval.instances import train
from dinov2.eval.instances.model import load_distance_model
from dinov2.eval.segmentation import train_loop

from .ball_stacks import write_ball_datalist

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ["--pretrained-weights", "none", "--head", "UNetFusion", "--image-size", "16", "--scale", "1",
       "--epochs", "1", "--epoch-length", "40", "--eval-iters", "20", "--warmup-iters", "2", "--batch-size", "2",
       "--learning-rate", "3e-3", "train.log_period_iterations=10", "model.train_backbone=true",
       "model.backbone_kwargs={embed_dim: 32, depth: 4, num_heads: 2, patch_size: 8}",
       "model.unetfusion.width=16", "evaluation.overlap=0.25", "postprocess.cells_max=[0.5,0.7]",
       "postprocess.cell_fill=[0.1,0.3]"]


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    return write_ball_datalist(tmp_path_factory.mktemp("balls"))


def test_training_lowers_the_loss_and_stores_thresholds(datalist, tmp_path):
    out = tmp_path / "run"
    assert train.main(RUN + ["--datalist", str(datalist), "--output-dir", str(out)]) == 0

    results = json.loads((out / "results.json").read_text())
    losses = [point["loss"] for point in results["curves"]["train"]]
    assert [p["iteration"] for p in results["curves"]["train"]] == [10, 20, 30, 40]
    assert losses[-1] < 0.7 * losses[0]

    model, info = load_distance_model(out / "best_model.pth")
    best = results["best"]
    assert info["iteration"] == best["iteration"]
    assert (info["thresholds"]["cells_max"], info["thresholds"]["cell_fill"]) == (best["cells_max"], best["cell_fill"])
    assert info["thresholds"]["cells_max"] in (0.5, 0.7) and info["thresholds"]["cell_fill"] in (0.1, 0.3)
    # segment needs nothing else: the preprocessing and the sliding window come with the model
    assert info["config"]["dataset"]["scale"] == 1.0 and info["config"]["dataset"]["image_size"] == [16, 16, 16]
    assert info["config"]["evaluation"]["overlap"] == 0.25

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [20, 40]
    assert max(line["op_csb"] for line in lines) == pytest.approx(best["op_csb"])
    test = results["test"]
    assert [case["name"] for case in test["cases"]] == ["balls3.tif"]
    assert test["thresholds"] == info["thresholds"] and 0.0 <= test["mean"]["op_csb"] <= 1.0
    with torch.no_grad():
        assert model(torch.rand(1, 1, 16, 16, 16)).shape == (1, 1, 16, 16, 16)


def test_killed_run_resumes_from_its_last_checkpoint(datalist, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    args = RUN + ["--datalist", str(datalist), "--output-dir", str(out), "--epoch-length", "20",
                  "--eval-iters", "10"]
    original_save = train_loop.atomic_torch_save

    def save_then_die(obj, path):
        original_save(obj, path)
        raise Killed  # the process dies right after the last checkpoint of iteration 10

    monkeypatch.setattr(train_loop, "atomic_torch_save", save_then_die)
    with pytest.raises(Killed):
        train.main(args)
    assert (out / "best_model.pth").is_file() and not (out / "results.json").exists()

    monkeypatch.setattr(train_loop, "atomic_torch_save", original_save)
    caplog.set_level("INFO", logger="dinov2.eval.segmentation.train_loop")
    assert train.main(args) == 0
    assert "Resumed from" in caplog.text and "at iteration 10" in caplog.text
    results = json.loads((out / "results.json").read_text())
    assert [p["iteration"] for p in results["curves"]["train"]] == [10, 20]  # 10 before the kill, 20 after
    assert [p["iteration"] for p in results["curves"]["validation"]] == [10, 20]


def test_every_bad_file_is_named_before_training(tmp_path, capsys):
    data = tmp_path / "data"
    datalist = write_ball_datalist(data)
    (data / "balls1.tif").unlink()
    (data / "balls2_labels.nii.gz").write_bytes(b"not a volume")
    out = tmp_path / "run"
    assert train.main(RUN + ["--datalist", str(datalist), "--output-dir", str(out)]) == 1
    error = capsys.readouterr().err
    assert error.count("ERROR:") == 1
    assert "balls1.tif" in error and "balls2_labels.nii.gz" in error
    assert not (out / "best_model.pth").exists()


def test_a_missing_required_value_is_one_error_line(capsys):
    assert train.main(["--output-dir", "x", "--pretrained-weights", "none"]) == 1
    assert "--datalist" in capsys.readouterr().err


def test_distance_loss_is_zero_at_the_target_and_bce_is_optional():
    target = torch.rand(2, 1, 4, 4, 4)
    other = torch.rand(2, 1, 4, 4, 4)
    mse = train.DistanceLoss(1.0, 0.0)
    both = train.DistanceLoss(1.0, 0.5)
    assert mse(target, target) == 0
    assert both(other, target) > mse(other, target)
    assert torch.isfinite(both(torch.zeros_like(target), torch.ones_like(target)))
    with pytest.raises(ValueError, match="bce_weight"):
        train.DistanceLoss(0.0, 0.0)
    np.testing.assert_allclose(float(mse(other, target)), float(((other - target) ** 2).mean()), rtol=1e-6)
