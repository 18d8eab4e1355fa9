"""The dense heads (DinoUNet, DPT, UNetFusion) export to ONNX and compute what PyTorch computes
(max abs difference 1e-4) on real T1 windows.

DPT and UNetFusion take any window size their head allows (DPT: multiples of lcm(32, p), here 32;
UNetFusion: multiples of the patch, 8); DinoUNet, driven through the adapter's deformable
attention like ViTAdapterUNETR, takes its training window only and refuses other sizes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from dinov2.checkpoints.finetuned import load_finetuned
from dinov2.eval.segmentation.onnx_model import load_onnx_model
from dinov2.export.__main__ import main as export_main
from dinov2.export.runtime import cpu_session

from .conftest import DENSE_HEAD_OPTIONS, crops, tiny_preset, write_finetuned

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-4
WINDOW = {"DinoUNet": 16, "DPT": 32, "UNetFusion": 16}  # training window side (patch 8)
# (batch, size) checked per head: the window, then other sizes where the graph takes them.
SIZES = {"DinoUNet": [(2, (16, 16, 16)), (3, (16, 16, 16))],
         "DPT": [(2, (32, 32, 32)), (1, (32, 64, 32)), (1, (64, 32, 96))],
         "UNetFusion": [(2, (16, 16, 16)), (2, (24, 16, 8)), (1, (8, 40, 32))]}
FREE_AXES = ["batch", 1, "height", "width", "depth"]


def windows(volume: torch.Tensor, size, count: int) -> torch.Tensor:
    """``count`` crops of ``size`` from ``(1, 1, S, S, S)``; an axis longer than ``S`` is first
    extended with the volume's mirror image (real content, no zeros)."""
    for axis, side in enumerate(size):
        while volume.shape[2 + axis] < side:
            volume = torch.cat([volume, volume.flip(2 + axis)], dim=2 + axis)
    return crops(volume, size, count)


@pytest.fixture(scope="module")
def dense_exported(tmp_path_factory, single_thread_session) -> dict:
    """head -> (best_model.pth, model.onnx written by python -m dinov2.export)."""
    folder = tmp_path_factory.mktemp("dense")
    paths = {}
    for head in DENSE_HEAD_OPTIONS:
        preset = tiny_preset(image_size=[WINDOW[head]] * 3)
        checkpoint = write_finetuned(folder / f"{head}.pth", head, preset)
        output = folder / f"{head}.onnx"
        assert export_main(["--checkpoint", str(checkpoint), "--format", "onnx", "--output", str(output)]) == 0
        paths[head] = (checkpoint, output)
    return paths


def input_dims(path) -> list:
    """The declared shape of the graph's input: names for free axes, numbers for fixed ones."""
    (graph_input,) = onnx.load(str(path), load_external_data=False).graph.input
    return [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]


@pytest.mark.parametrize("head", sorted(DENSE_HEAD_OPTIONS))
def test_exported_dense_head_matches_pytorch(head, dense_exported, real_windows):
    checkpoint, exported = dense_exported[head]
    model, _, _ = load_finetuned(checkpoint)
    session = cpu_session(exported, threads=1)
    for batch, size in SIZES[head]:
        image = windows(real_windows, size, batch)
        with torch.no_grad():
            expected = model(image).numpy()
        (logits,) = session.run(["logits"], {"image": image.numpy()})
        assert logits.shape == expected.shape == (batch, 3, *size)
        assert np.abs(logits - expected).max() <= TOLERANCE, (head, size)


@pytest.mark.parametrize("head, dims, multiple", [("DinoUNet", ["batch", 1, 16, 16, 16], 16),
                                                  ("DPT", FREE_AXES, 32), ("UNetFusion", FREE_AXES, 8)])
def test_sizes_the_graph_takes_are_declared(head, dims, multiple, dense_exported):
    _, exported = dense_exported[head]
    assert input_dims(exported) == dims
    segmenter, _, _ = load_onnx_model(exported, threads=1)
    assert segmenter.input["dynamic_spatial"] == (dims == FREE_AXES)
    assert segmenter.input["spatial_multiple"] == multiple  # predict --model checks windows against it
    with pytest.raises(ValueError, match=f"multiples of {multiple}|windows of"):
        segmenter.check_input((1, 1, multiple + multiple // 2, 16, 16))  # not a multiple


def test_the_dinounet_graph_refuses_another_window_size(dense_exported, real_windows):
    session = cpu_session(dense_exported["DinoUNet"][1], threads=1)
    with pytest.raises(Exception, match="(?i)dimension"):  # ONNX Runtime checks the declared input shape
        session.run(["logits"], {"image": crops(real_windows, (32, 16, 16), 1).numpy()})
