"""Tiny finetuned segmenters (every head), a tiny teacher and a real T1 volume, shared by the export tests.

Built once per session on one thread: vit_tiny_3d of width 32, depth 4, patch 8, 16³ windows.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from dinov2.checkpoints import save_teacher_checkpoint  # noqa: E402
from dinov2.checkpoints.finetuned import save_finetuned  # noqa: E402
from dinov2.eval.presets import DatasetPreset, load_preset  # noqa: E402
from dinov2.eval.segmentation.model import HEAD_OPTION_SECTIONS, build_segmentation_model  # noqa: E402
from dinov2.export.__main__ import main as export_main  # noqa: E402
from dinov2.models import build_model  # noqa: E402

BACKBONE = {"embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 8, "img_size": 16}
HEAD_OPTIONS = {"UNETR": {"feature_size": 4}, "Linear": {},
                "ViTAdapterUNETR": {"feature_size": 4, "spm_width": 8, "num_heads": 2, "n_points": 2}}
HEADS = tuple(HEAD_OPTIONS)
# The dense heads of issue #16, exported in tests/export/test_onnx_dense_heads.py (own fixtures, so the
# shared `finetuned` / `exported` fixtures stay as fast as they were).
DENSE_HEAD_OPTIONS = {"DinoUNet": {"widths": [4, 8, 8, 8], "rank": 8, "spm_width": 4, "n_points": 2},
                      "DPT": {"widths": [4, 8, 8, 8], "fusion_width": 8, "head_width": 4},
                      "UNetFusion": {"width": 8}}
SIDE = 32  # the real volume is cropped to SIDE³ voxels


def tiny_preset(**changes) -> DatasetPreset:
    """brain_tissue at 3 mm (the volume's own spacing: no resampling cost) with 16³ windows."""
    raw = dict(load_preset("brain_tissue"))
    raw.update(image_size=[16, 16, 16], spacing=[3.0, 3.0, 3.0], classes=["background", "dark", "bright"],
               intensity={"mode": "percentile", "lower": 1, "upper": 99})
    raw.update(changes)
    return DatasetPreset.from_config(raw)


@pytest.fixture(scope="session")
def single_thread_session():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def real_volume(crop_sample_volume) -> Path:
    """A real T1 MRI (the MNI152 3 mm template, or another sample volume) cropped to SIDE³ at its centre."""
    return crop_sample_volume("MNI152_T1_3mm.nii.gz", SIDE, "t1_crop.nii.gz")


@pytest.fixture(scope="session")
def real_windows(real_volume) -> torch.Tensor:
    """The cropped volume scaled to [0, 1] (as the preset's percentile normalisation does), ``(1, 1, S, S, S)``."""
    data = np.asarray(nib.load(real_volume).dataobj, dtype=np.float32)
    low, high = np.percentile(data, [1, 99])
    return torch.from_numpy(np.clip((data - low) / (high - low), 0, 1).astype(np.float32))[None, None]


def crops(volume: torch.Tensor, size, count: int) -> torch.Tensor:
    """``count`` different crops of ``size`` from ``(1, 1, S, S, S)``, stacked as a batch ``(count, 1, *size)``."""
    out = []
    for k in range(count):
        start = [min(4 * k + 2, volume.shape[2 + a] - s) for a, s in enumerate(size)]
        out.append(volume[0, :, start[0]:start[0] + size[0], start[1]:start[1] + size[1], start[2]:start[2] + size[2]])
    return torch.stack(out)


def write_finetuned(path: Path, head: str, preset: DatasetPreset | None = None, seed: int = 0,
                    merge: str = "concat") -> Path:
    """A finetuned checkpoint of a tiny random model with ``head`` (``merge``: of several modalities)."""
    preset = preset or tiny_preset()
    torch.manual_seed(seed)
    options = {**HEAD_OPTIONS, **DENSE_HEAD_OPTIONS}[head]
    model = build_segmentation_model(build_model("vit_tiny_3d", **BACKBONE), head, preset.in_channels,
                                     preset.out_channels, options, merge_mode=merge)
    config = {"model": {HEAD_OPTION_SECTIONS[head]: options, "modality_merge": merge},
              "evaluation": {"overlap": 0.25, "sw_batch_size": 3}}
    return save_finetuned(path, model, {"arch": "vit_tiny_3d", "kwargs": BACKBONE}, config, preset, 11,
                          {"name": "dice", "value": 0.5})


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory, single_thread_session) -> dict[str, Path]:
    """head -> best_model.pth of a tiny random segmenter."""
    folder = tmp_path_factory.mktemp("finetuned")
    return {head: write_finetuned(folder / f"{head}.pth", head) for head in HEADS}


@pytest.fixture(scope="session")
def exported(finetuned, tmp_path_factory, single_thread_session) -> dict[str, Path]:
    """head -> the .onnx written by python -m dinov2.export from :func:`finetuned`."""
    folder = tmp_path_factory.mktemp("onnx")
    paths = {}
    for head, checkpoint in finetuned.items():
        paths[head] = folder / f"{head}.onnx"
        assert export_main(["--checkpoint", str(checkpoint), "--format", "onnx", "--output", str(paths[head])]) == 0
    return paths


@pytest.fixture(scope="session")
def teacher(tmp_path_factory, single_thread_session) -> Path:
    """A teacher checkpoint of a tiny random backbone with one register token and a non-cubic native size."""
    torch.manual_seed(1)
    backbone = build_model("vit_tiny_3d", embed_dim=32, depth=4, num_heads=2, patch_size=8, img_size=(16, 24, 16),
                           num_register_tokens=1)
    with torch.no_grad():  # a position embedding with structure, so resampling it is really checked
        backbone.pos_embed.normal_()
    config = {"student": {"arch": "vit_tiny_3d", "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2,
                          "num_register_tokens": 1},
              "crops": {"global_crops_size": [16, 24, 16]}}
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    return save_teacher_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher_checkpoint.pth", state, config, 3)
