"""``python -m dinov2.eval.instances segment`` on a folder mixing TIFF, NIfTI and a broken file."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch

from dinov2.eval.instances import __main__ as instances_cli
from dinov2.eval.instances import train
from dinov2.eval.instances.io import read_image, read_labels
from dinov2.eval.instances.model import build_distance_model, save_distance_model
from dinov2.utils.config import config_to_dict

from .ball_stacks import nifti_affine, touching_balls, write_nifti, write_tiff

pytestmark = pytest.mark.usefixtures("one_thread")

TIFF_SPACING = (0.5, 0.5, 2.0)
# Stored thresholds no sigmoid output reaches: without flags, no object at all.
UNREACHABLE = {"cells_max": 1.0, "cell_fill": 0.99}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random-init model saved as ``train`` saves it, with the packaged defaults as its config."""
    folder = tmp_path_factory.mktemp("model")
    args = train.get_args_parser().parse_intermixed_args([
        "--datalist", "unused.json", "--output-dir", str(folder), "--pretrained-weights", "none",
        "--head", "UNetFusion", "--image-size", "16", "--scale", "1.5", "model.unetfusion.width=8",
        "model.backbone_kwargs={embed_dim: 32, depth: 4, num_heads: 2, patch_size: 8}"])
    cfg = train.build_config(args)
    torch.manual_seed(0)
    model, spec = build_distance_model("none", config_to_dict(cfg)["model"], (16, 16, 16))
    return save_distance_model(folder / "best_model.pth", model, spec, config_to_dict(cfg), UNREACHABLE, 1,
                               {"name": "validation mean OP_CSB", "value": 0.0})


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    """A folder with a TIFF stack, a NIfTI stack and a file that only looks like a TIFF."""
    folder = tmp_path_factory.mktemp("stacks")
    image, _ = touching_balls((20, 18, 10), TIFF_SPACING, seed=1)
    write_tiff(folder / "cells.tif", image, TIFF_SPACING)
    scan, _ = touching_balls((14, 16, 12), (1.0, 1.0, 1.0), seed=2)
    write_nifti(folder / "scan.nii.gz", scan, nifti_affine((1, 1, 1)))
    (folder / "broken.tif").write_bytes(b"II*\x00 truncated")
    return folder


def test_folder_gives_labels_in_each_inputs_format_and_one_line_per_bad_file(checkpoint, stacks, tmp_path, capsys):
    out = tmp_path / "out"
    code = instances_cli.main(["segment", str(stacks), "--checkpoint", str(checkpoint), "--output", str(out),
                               "--cells-max", "1e-4", "--cell-fill", "0", "--save-distance"])
    assert code == 1
    err = capsys.readouterr().err
    bad_lines = [line for line in err.splitlines() if "broken.tif" in line and "Skipped" in line]
    assert len(bad_lines) == 1 and "TIFF" in bad_lines[0]

    labels = read_labels(out / "cells_instances.tif")
    assert labels.shape == (20, 18, 10) and labels.spacing == pytest.approx(TIFF_SPACING)
    assert tifffile.TiffFile(out / "cells_instances.tif").pages.first.dtype == np.uint16
    assert labels.array.max() >= 1  # thresholds below every output: objects everywhere
    scan = nib.load(out / "scan_instances.nii.gz")
    np.testing.assert_allclose(scan.affine, nifti_affine((1, 1, 1)))
    assert scan.shape == (14, 16, 12) and scan.get_data_dtype() == np.uint16
    for png in ("cells_instances.png", "scan_instances.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    distance = np.asarray(nib.load(out / "scan_distance.nii.gz").dataobj)
    assert distance.dtype == np.float32 and 0.0 <= distance.min() <= distance.max() <= 1.0
    tiff_distance = read_image(out / "cells_distance.tif")  # a TIFF input gives a TIFF map with its spacing
    assert tiff_distance.shape == (20, 18, 10) and tiff_distance.spacing == pytest.approx(TIFF_SPACING)
    assert not (out / "broken_instances.tif").exists()
    assert "broken.tif" in (out / "skipped.tsv").read_text()


def test_stored_thresholds_apply_unless_a_flag_overrides_them(checkpoint, stacks, tmp_path):
    image = stacks / "cells.tif"
    assert instances_cli.main(["segment", str(image), "--checkpoint", str(checkpoint), "--output",
                               str(tmp_path / "stored"), "--no-preview"]) == 0
    assert read_labels(tmp_path / "stored" / "cells_instances.tif").array.max() == 0
    assert not (tmp_path / "stored" / "cells_instances.png").exists()
    assert instances_cli.main(["segment", str(image), "--checkpoint", str(checkpoint), "--output",
                               str(tmp_path / "flags"), "--cells-max", "1e-4", "--cell-fill", "0",
                               "--spacing", "1", "1", "3"]) == 0
    labels = read_labels(tmp_path / "flags" / "cells_instances.tif")
    assert labels.array.max() >= 1 and labels.spacing == pytest.approx((1.0, 1.0, 3.0))


def test_thresholds_in_the_wrong_order_are_one_error_line(checkpoint, stacks, tmp_path, capsys):
    code = instances_cli.main(["segment", str(stacks / "cells.tif"), "--checkpoint", str(checkpoint), "--output",
                               str(tmp_path / "out"), "--cell-fill", "0.5", "--cells-max", "0.4"])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("ERROR: --cell-fill (0.5) must be below")


def test_help_lists_the_commands(capsys):
    assert instances_cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(command in text for command in ("train", "segment", "evaluate", "baseline"))
