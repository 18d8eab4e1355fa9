"""Predictions are written in each input's original space (shape, affine, orientation)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
from PIL import Image
from torch import nn

from dinov2.checkpoints.finetuned import save_finetuned
from dinov2.eval.presets import DatasetPreset, load_preset
from dinov2.eval.segmentation import predict
from dinov2.eval.segmentation.inference import predict_case
from dinov2.eval.segmentation.model import build_segmentation_model
from dinov2.models import build_model

# A non-RAS grid: axes permuted (array axis 0 runs anterior-posterior), flipped, anisotropic voxels.
LPI_PERMUTED_AFFINE = np.array([
    [0.0, -1.5, 0.0, 40.0],
    [-2.5, 0.0, 0.0, 60.0],
    [0.0, 0.0, -2.0, 30.0],
    [0.0, 0.0, 0.0, 1.0],
])


def tiny_preset() -> DatasetPreset:
    raw = dict(load_preset("brain_tissue"))
    raw.update(roi_size=[16, 16, 16], classes=["background", "bright"], intensity={"mode": "percentile", "lower": 0, "upper": 100})
    return DatasetPreset.from_config(raw)


def phantom(tmp_path):
    """Background 0, a dim slab and an off-centre bright box (so a flipped or transposed result shows)."""
    data = np.zeros((30, 26, 22), dtype=np.float32)
    data[4:26, 3:23, 3:19] = 30.0
    data[6:14, 5:17, 10:18] = 100.0
    path = tmp_path / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(data, LPI_PERMUTED_AFFINE), path)
    return path, data > 50


class Threshold(nn.Module):
    """Class 1 where the normalised intensity exceeds 0.5: a model whose right answer is known."""

    def forward(self, x):
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 20


def test_prediction_is_aligned_with_a_non_ras_input(tmp_path):
    path, bright = phantom(tmp_path)
    out = predict_case(Threshold(), tiny_preset(), [str(path)], tmp_path / "pred.nii.gz", overlap=0.25)
    img = nib.load(out)
    assert img.shape == bright.shape
    np.testing.assert_allclose(img.affine, LPI_PERMUTED_AFFINE)
    assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(LPI_PERMUTED_AFFINE)
    pred = np.asarray(img.dataobj) == 1
    dice = 2 * (pred & bright).sum() / (pred.sum() + bright.sum())
    assert dice > 0.9, dice  # resampling to 2 mm and back blurs only the box's border voxels


def tiny_checkpoint(tmp_path):
    """A finetuned-checkpoint file of a tiny random UNETR (2 classes), as segmentation finetuning writes it."""
    torch.manual_seed(0)
    kwargs = {"embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 8, "img_size": 16}
    model = build_segmentation_model(build_model("vit_tiny_3d", **kwargs), "UNETR", 1, 2, {"feature_size": 4})
    config = {"model": {"unetr": {"feature_size": 4}, "modality_merge": "concat"}, "evaluation": {"overlap": 0.25}}
    return save_finetuned(tmp_path / "best_model.pth", model, {"arch": "vit_tiny_3d", "kwargs": kwargs}, config,
                          tiny_preset(), 7, {"name": "x", "value": 0.5})


def test_predict_cli_writes_input_space_label_maps(tmp_path, capsys):
    path, _ = phantom(tmp_path)
    ckpt = tiny_checkpoint(tmp_path)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    path.rename(inputs / "case_a.nii.gz")
    assert predict.main(["--checkpoint", str(ckpt), "--input", str(inputs), "--output", str(tmp_path / "out"),
                         "--tta-flip"]) == 0
    out, err = capsys.readouterr()
    assert out.strip().endswith("case_a_seg.nii.gz")  # the written path, alone on stdout
    preview = Image.open(tmp_path / "out" / "case_a_seg.png")
    assert preview.width > 30 and preview.height > 26  # three views of the 30x26x22 input, two rows
    assert "predict" in err and "1/1" in err  # the progress bar over cases (rate, ETA) on stderr
    img = nib.load(tmp_path / "out" / "case_a_seg.nii.gz")
    assert img.shape == (30, 26, 22)
    np.testing.assert_allclose(img.affine, LPI_PERMUTED_AFFINE)
    assert np.issubdtype(img.get_data_dtype(), np.integer)
    assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1}


def test_predict_cli_names_the_fix_for_a_folder_without_images(tmp_path, error_line):
    (tmp_path / "data" / "images").mkdir(parents=True)
    assert predict.main(["--checkpoint", str(tmp_path / "missing.pth"), "--input", str(tmp_path / "data"),
                         "--output", str(tmp_path / "out")]) == 1
    assert "sub-folders are not searched; it has images/" in error_line()
    assert not (tmp_path / "out").exists()


def test_predict_cli_reports_a_missing_checkpoint(tmp_path, error_line):
    path, _ = phantom(tmp_path)
    assert predict.main(["--checkpoint", str(tmp_path / "missing.pth"), "--input", str(path),
                         "--output", str(tmp_path / "out")]) == 1
    line = error_line()
    assert "not found: " in line and "missing.pth" in line and "best_model.pth written by" in line


def test_predict_cli_no_preview(tmp_path):
    path, _ = phantom(tmp_path)
    ckpt = tiny_checkpoint(tmp_path)
    assert predict.main(["--checkpoint", str(ckpt), "--input", str(path), "--output", str(tmp_path / "out"),
                         "--no-preview"]) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == [f"{path.name.split('.')[0]}_seg.nii.gz"]
