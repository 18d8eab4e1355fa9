"""The metadata stored with an export rebuilds what predict reads from best_model.pth."""

from __future__ import annotations

import dataclasses
import json

import onnx
import pytest
import torch

from dinov2.checkpoints.finetuned import load_finetuned
from dinov2.eval.segmentation.onnx_model import load_onnx_model
from dinov2.export import METADATA_KEY, OnnxModelError, parse_metadata, read_metadata
from dinov2.export.metadata import dumps, input_section, preset_from_metadata, segmentation_metadata
from dinov2.export.runtime import cpu_session

from .conftest import tiny_preset

pytestmark = pytest.mark.usefixtures("one_thread")


def test_metadata_round_trip_gives_back_the_checkpoints_preset_and_settings(finetuned, exported):
    _, preset, info = load_finetuned(finetuned["UNETR"])
    meta = read_metadata(exported["UNETR"])
    assert meta["kind"] == "segmentation" and meta["head"] == "UNETR" and meta["format_version"] == 1
    assert preset_from_metadata(meta) == preset  # every field, the raw preset included
    assert {k: meta["evaluation"][k] for k in ("overlap", "blend", "sw_batch_size")} == {
        "overlap": 0.25, "blend": "gaussian", "sw_batch_size": 3}  # the run's, over the packaged defaults
    assert meta["input"] == {"name": "image", "layout": "BCHWD", "channels": 1, "dynamic_batch": True,
                             "dynamic_spatial": True, "spatial_multiple": 8, "example_size": [16, 16, 16]}
    assert meta["summary"]["window"] == [16, 16, 16] and meta["summary"]["spacing_mm"] == [3.0, 3.0, 3.0]
    assert meta["summary"]["channel_names"] == ["background", "dark", "bright"]
    assert meta["summary"]["orientation"] == "RAS" and meta["summary"]["activation"] == "softmax"
    assert meta["source"] == {"checkpoint": finetuned["UNETR"].name, "iteration": 11,
                              "metric": {"name": "dice", "value": 0.5}}
    assert all(check["max_abs_diff"] < 1e-4 for check in meta["export"]["verified"])
    assert info["head"] == meta["head"]


def test_onnx_runtime_reads_the_same_metadata_without_the_onnx_package(exported):
    props = cpu_session(exported["Linear"]).get_modelmeta().custom_metadata_map
    assert parse_metadata(props, "x") == read_metadata(exported["Linear"])


def test_loader_returns_what_load_finetuned_returns(finetuned, exported):
    model, preset, info = load_onnx_model(exported["ViTAdapterUNETR"], threads=1)
    torch_model, torch_preset, torch_info = load_finetuned(finetuned["ViTAdapterUNETR"])
    assert preset == torch_preset and info["head"] == torch_info["head"] and info["iteration"] == 11
    assert info["config"]["evaluation"]["overlap"] == torch_info["config"]["evaluation"]["overlap"]
    assert model.training is False and model.eval() is model and model.train(False) is model
    image = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(image) - torch_model(image)).abs().max() <= 1e-4
    with pytest.raises(ValueError, match=r"windows of \[16, 16, 16\] only"):
        model(torch.rand(1, 1, 32, 16, 16))


def test_multilabel_regions_and_remap_survive_json():
    preset = tiny_preset(classes=None, regions={"whole": [1, 2, 4], "core": [1, 4], "enhancing": [4]},
                         loss="dice_sigmoid", remap={4: 3}, resize_scale=1.5)
    meta = segmentation_metadata(preset, {"head": "UNETR", "iteration": 1}, {"overlap": 0.5, "blend": "gaussian"},
                                 input_section(1, preset.roi_size, True, 8), "best_model.pth")
    back = preset_from_metadata(parse_metadata({METADATA_KEY: dumps(meta)}, "m.onnx"))
    assert dataclasses.replace(back, raw={}) == dataclasses.replace(preset, raw={})  # JSON keys are strings
    assert back.multilabel and back.regions == {"whole": (1, 2, 4), "core": (1, 4), "enhancing": (4,)}
    assert back.remap == {4: 3} and back.spacing == pytest.approx((2.0, 2.0, 2.0))
    assert meta["summary"]["spacing_mm"] == pytest.approx([2.0, 2.0, 2.0])  # 3 mm / resize_scale 1.5
    assert meta["summary"]["activation"] == "sigmoid" and meta["summary"]["region_label_values"]["core"] == [1, 4]


@pytest.mark.parametrize("props,words", [
    ({}, "without dinov2 metadata"),
    ({METADATA_KEY: "{not json"}, "not valid JSON"),
    ({METADATA_KEY: json.dumps({"format": "other", "kind": "segmentation"})}, "not of format"),
    ({METADATA_KEY: json.dumps({"format": "dinov2_3d_onnx", "kind": "segmentation", "format_version": 99})},
     "format_version 99"),
    ({METADATA_KEY: json.dumps({"format": "dinov2_3d_onnx", "kind": "segmentation", "format_version": 1,
                                "input": {}, "outputs": ["logits"], "head": "UNETR"})}, "lacks preset, evaluation"),
])
def test_unusable_metadata_is_one_clear_error(props, words):
    with pytest.raises(OnnxModelError, match=words) as raised:
        parse_metadata(props, "model.onnx")
    assert "model.onnx" in str(raised.value)


def test_write_keeps_other_metadata_entries(exported, tmp_path):
    from dinov2.export.metadata import write_metadata

    model = onnx.load(str(exported["Linear"]))
    onnx.helper.set_model_props(model, {"author": "someone"})
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    write_metadata(path, {"format": "dinov2_3d_onnx", "format_version": 1, "kind": "backbone", "input": {}})
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["author"] == "someone" and json.loads(props[METADATA_KEY])["kind"] == "backbone"
