"""Exported graphs compute what PyTorch computes (max abs difference 1e-4) on real T1 crops.

Every head with a batch of 2 at the training window and, where the size is free, at a second
spatial size; the bare backbone's CLS and patch tokens likewise; the adapter's graph refuses
another size instead of computing something else.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from dinov2.checkpoints import build_model_from_checkpoint
from dinov2.checkpoints.finetuned import load_finetuned
from dinov2.export.__main__ import main as export_main
from dinov2.export.runtime import cpu_session

from .conftest import HEADS, crops

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-4
# (batch, size) checked per head: the window, then another size where the graph takes one.
SIZES = {"UNETR": [(2, (16, 16, 16)), (2, (24, 16, 8))], "Linear": [(2, (16, 16, 16)), (2, (8, 24, 16))],
         "ViTAdapterUNETR": [(2, (16, 16, 16)), (3, (16, 16, 16))]}


def input_dims(path) -> list:
    """The declared shape of the graph's input: names for free axes, numbers for fixed ones."""
    (graph_input,) = onnx.load(str(path), load_external_data=False).graph.input
    return [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]


@pytest.mark.parametrize("head", HEADS)
def test_exported_segmenter_matches_pytorch(head, finetuned, exported, real_windows):
    model, _, _ = load_finetuned(finetuned[head])
    session = cpu_session(exported[head], threads=1)
    for batch, size in SIZES[head]:
        image = crops(real_windows, size, batch)
        with torch.no_grad():
            expected = model(image).numpy()
        (logits,) = session.run(["logits"], {"image": image.numpy()})
        assert logits.shape == expected.shape == (batch, 3, *size)
        assert np.abs(logits - expected).max() <= TOLERANCE, (head, size)


@pytest.mark.parametrize("head,dims", [("UNETR", ["batch", 1, "height", "width", "depth"]),
                                       ("Linear", ["batch", 1, "height", "width", "depth"]),
                                       ("ViTAdapterUNETR", ["batch", 1, 16, 16, 16])])
def test_free_axes_are_declared_in_the_graph(head, dims, exported):
    assert input_dims(exported[head]) == dims


def test_the_adapter_graph_refuses_another_window_size(exported, real_windows):
    session = cpu_session(exported["ViTAdapterUNETR"], threads=1)
    with pytest.raises(Exception, match="(?i)dimension"):  # ONNX Runtime checks the declared input shape
        session.run(["logits"], {"image": crops(real_windows, (32, 16, 16), 1).numpy()})


def test_exported_backbone_matches_pytorch(teacher, tmp_path, real_windows):
    output = tmp_path / "vit.onnx"
    assert export_main(["--checkpoint", str(teacher), "--format", "onnx", "--output", str(output)]) == 0
    backbone = build_model_from_checkpoint(teacher)
    session = cpu_session(output, threads=1)
    assert input_dims(output) == ["batch", 1, "height", "width", "depth"]
    # The native grid (2, 3, 2), one with a kept and two resampled axes, and one growing every axis.
    for batch, size in [(2, (16, 24, 16)), (2, (16, 8, 32)), (1, (24, 32, 24))]:
        image = crops(real_windows, size, batch)
        with torch.no_grad():
            features = backbone.forward_features(image)
        cls, patches = session.run(["cls_token", "patch_tokens"], {"image": image.numpy()})
        assert cls.shape == (batch, 32) and patches.shape == (batch, np.prod(size) // 512, 32)
        assert np.abs(cls - features["x_norm_clstoken"].numpy()).max() <= TOLERANCE, size
        assert np.abs(patches - features["x_norm_patchtokens"].numpy()).max() <= TOLERANCE, size


def test_export_leaves_the_model_as_it_was(finetuned, tmp_path):
    """The traceable position embedding lives only during the export."""
    from dinov2.export.onnx_export import plan_export, trace_to_onnx

    plan = plan_export(finetuned["UNETR"])
    trace_to_onnx(plan, tmp_path / "m.onnx")
    assert "interpolate_pos_encoding" not in vars(plan.backbone)


@pytest.mark.parametrize("merge", ["concat", "mean"])
def test_two_modalities_through_a_one_channel_backbone(merge, tmp_path, real_windows):
    """Modalities travel as extra batch entries inside the graph: the batch stays free."""
    from .conftest import tiny_preset, write_finetuned

    checkpoint = write_finetuned(tmp_path / "best_model.pth", "UNETR", tiny_preset(modalities=["T1w", "T2w"]),
                                 merge=merge)
    assert export_main(["--checkpoint", str(checkpoint), "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 0
    model, _, _ = load_finetuned(checkpoint)
    session = cpu_session(tmp_path / "m.onnx", threads=1)
    for batch, size in [(2, (16, 16, 16)), (3, (8, 16, 24))]:
        one = crops(real_windows, size, batch)
        image = torch.cat([one, 1 - one], dim=1)  # a second, contrast-inverted modality
        with torch.no_grad():
            expected = model(image).numpy()
        (logits,) = session.run(["logits"], {"image": image.numpy()})
        assert np.abs(logits - expected).max() <= TOLERANCE, (merge, size)
