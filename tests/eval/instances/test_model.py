"""The distance model: a segmentation head with one sigmoid channel on a (frozen or trained) ViT."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from dinov2.eval.instances.model import (InstanceCheckpointError, build_distance_model, load_distance_model,
                                         predict_distance, save_distance_model)
from dinov2.utils.config import load_yaml, packaged_config_path

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 8}


def model_config(head: str, train_backbone: bool = False) -> dict:
    """The packaged model section (segmentation's heads under the instance defaults) for a tiny ViT."""
    merged = OmegaConf.merge(load_yaml(packaged_config_path("eval/segmentation_default")).model,
                             load_yaml(packaged_config_path("eval/instances_default")).model,
                             {"head": head, "train_backbone": train_backbone, "backbone_kwargs": TINY,
                              "unetr": {"feature_size": 8}, "unetfusion": {"width": 8},
                              "dinounet": {"widths": [8, 16, 16, 16], "spm_width": 8}})
    return OmegaConf.to_container(merged, resolve=True)


@pytest.mark.parametrize("head", ["UNETR", "UNetFusion", "DinoUNet"])
def test_one_channel_in_the_unit_interval(head):
    torch.manual_seed(0)
    model, spec = build_distance_model("none", model_config(head), (16, 16, 16))
    with torch.no_grad():
        out = model(torch.randn(2, 1, 16, 16, 16) * 5)
    assert out.shape == (2, 1, 16, 16, 16) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0 and float(out.std()) > 0
    assert spec["arch"] == "vit_tiny_3d"


@pytest.mark.parametrize("train_backbone", [False, True])
def test_a_frozen_backbone_gets_no_gradient(train_backbone):
    model, _ = build_distance_model("none", model_config("UNETR", train_backbone), (16, 16, 16))
    model.train()
    model(torch.randn(1, 1, 16, 16, 16)).mean().backward()
    backbone_grads = [p.grad for p in model.backbone.parameters()]
    assert all(p.grad is not None for p in model.head.parameters() if p.requires_grad)
    if train_backbone:
        assert any(g is not None and g.abs().sum() > 0 for g in backbone_grads)
    else:
        assert all(g is None for g in backbone_grads) and not model.backbone.training


def test_a_missing_weights_file_is_an_error(tmp_path):
    missing = tmp_path / "nowhere" / "teacher_checkpoint.pth"
    with pytest.raises(FileNotFoundError, match="teacher_checkpoint.pth"):
        build_distance_model(str(missing), model_config("UNETR"), (16, 16, 16))


def test_sliding_window_keeps_the_shape_of_any_stack():
    model, _ = build_distance_model("none", model_config("UNetFusion"), (16, 16, 16))
    out = predict_distance(model.eval(), torch.randn(1, 1, 21, 13, 30), (16, 16, 16), overlap=0.25)
    assert out.shape == (1, 1, 21, 13, 30) and 0.0 <= float(out.min()) <= float(out.max()) <= 1.0


def test_checkpoint_round_trip_and_foreign_files(tmp_path):
    torch.manual_seed(1)
    cfg = model_config("UNETR", train_backbone=True)
    model, spec = build_distance_model("none", cfg, (16, 16, 16))
    path = save_distance_model(tmp_path / "best_model.pth", model, spec, {"model": cfg, "dataset": {"scale": 2.0}},
                               {"cells_max": 0.6, "cell_fill": 0.2}, 7, {"name": "validation OP_CSB", "value": 0.5})
    loaded, info = load_distance_model(path)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    assert info["thresholds"] == {"cells_max": 0.6, "cell_fill": 0.2} and info["iteration"] == 7
    # what the stored config lacks comes from the packaged defaults; what it has wins
    assert info["config"]["postprocess"]["min_voxels"] == 0 and info["config"]["dataset"]["scale"] == 2.0
    assert not loaded.training and not any(p.requires_grad for p in loaded.backbone.parameters())

    torch.save({"teacher": {}}, tmp_path / "teacher.pth")
    with pytest.raises(InstanceCheckpointError, match="teacher.pth.*python -m dinov2.eval.instances train"):
        load_distance_model(tmp_path / "teacher.pth")
