"""Visualisation (``dinov2.eval.visualisation.run.main``): the bad-input kinds not tested elsewhere (issue #14).

A random-init ``vit_tiny_3d`` (patch 8) on 16^3 volumes. A bad image, mask or checkpoint is one
``ERROR:`` line naming the file, exit code 1, no traceback and no map, montage or
``summary.json``. The matrix (where the other rows are tested):

==============================  ================================================================
kind                            outcome
==============================  ================================================================
empty, random_bytes, 2d, 5d     error naming the file (here)
truncated_gzip, all_nan         error naming the file (tests/eval/test_segmentation_inputs.py::
                                test_visualisation_cli_names_a_bad_image)
missing image                   error naming the file (tests/eval/test_cli_errors.py)
4d                              tolerated: frame 0 by default (here); a frame out of range is an
                                error (tests/eval/test_segmentation_inputs.py)
some_inf (partial +-Inf)        tolerated: one warning naming the file (here)
smaller_than_crop (6^3)         attention maps: tolerated, maps on the input's 6^3 grid; PCA:
                                error naming the file, too few foreground tokens (here)
mask shape / affine mismatch    error naming the mask and the image (here; the --mask-path
                                counterpart of a label map)
label values outside classes    n/a (a mask is foreground wherever it is non-zero)
datalist kinds                  n/a (the command takes image paths)
checkpoint missing / text /     error naming the file (here)
other architecture (2D ViT)
==============================  ================================================================
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import pytest

from dinov2.eval.visualisation import run as vis_run

OUTPUTS = ("*.nii.gz", "*.png", "summary.json")
RANDOM_INIT = ["--pretrained-weights", "none", "--arch", "vit_tiny_3d", "--backbone-kwarg", "patch_size=8"]

# kind -> (outcome, words); --vis-type mhsa for the tolerated kinds (a 16^3 input at patch 8 has
# 8 tokens, fewer than PCA's 10 components)
IMAGES = {
    "empty": ("error", "the image file is empty (0 bytes)"),
    "random_bytes": ("error", "not gzip-compressed"),
    "2d": ("error", "the image is 2D"),
    "4d": ("kept", None),
    "5d": ("error", "the image is 5D"),
    "some_inf": ("warn", "3 of 4096 voxels are NaN or +-Inf"),
    "smaller_than_crop": ("kept", None),
}
ELSEWHERE = {"truncated_gzip", "all_nan"}  # tests/eval/test_segmentation_inputs.py
MASKS = {"label_shape_mismatch": "has shape [16, 16, 12]", "label_affine_mismatch": "affine differs"}
CHECKPOINTS = {
    "missing": "Checkpoint file not found",
    "text": "it is a text file",
    "other_architecture": "pos_embed covers 256 patches, not a cube",
}


def run(image: Path, out: Path, *extra: str, weights: list[str] = RANDOM_INIT) -> int:
    return vis_run.main([*weights, "--image-path", str(image), "--output-dir", str(out), *extra])


def test_the_table_covers_every_image_kind(bad):
    assert set(IMAGES) | ELSEWHERE == set(bad.IMAGE_KINDS)


@pytest.mark.parametrize("kind", list(IMAGES))
def test_image_kind(kind, tmp_path, bad, user_error, caplog, capsys, fresh_nonfinite_warnings):
    outcome, words = IMAGES[kind]
    image = bad.IMAGE_KINDS[kind](tmp_path / f"{kind}.nii.gz")
    out = tmp_path / "out"
    code = run(image, out, "--vis-type", "mhsa")
    if outcome == "error":
        line = user_error(code, image, outputs_in=(out, OUTPUTS))
        assert words in line, line
        return
    assert code == 0 and "Traceback" not in capsys.readouterr().err
    stem = "4d_frame0" if kind == "4d" else kind
    heads = sorted(out.glob(f"{stem}_attn_head*.nii.gz"))
    assert heads and (out / f"{stem}_attn.png").is_file() and (out / "summary.json").is_file()
    shape = bad.SMALL_SHAPE if kind == "smaller_than_crop" else bad.SHAPE
    assert nib.load(heads[0]).shape == shape  # on the input's own grid
    warned = bad.warnings_naming(caplog, image)
    assert len(warned) == (1 if outcome == "warn" else 0), warned
    if words:
        assert words in warned[0]


def test_pca_of_a_volume_too_small_for_its_components_names_the_file(tmp_path, bad, user_error):
    image = bad.small(tmp_path / "small.nii.gz")
    out = tmp_path / "out"
    line = user_error(run(image, out), image, outputs_in=(out, OUTPUTS))
    assert "foreground tokens" in line and "--n-components" in line, line


@pytest.mark.parametrize("kind", list(MASKS))
def test_mask_kind(kind, tmp_path, bad, user_error):
    image = bad.good(tmp_path / "image.nii.gz")
    mask = bad.LABEL_KINDS[kind](tmp_path / "mask.nii.gz")
    out = tmp_path / "out"
    line = user_error(run(image, out, "--mask-path", str(mask)), mask, image, outputs_in=(out, OUTPUTS))
    assert MASKS[kind] in line, line


@pytest.mark.parametrize("kind", list(CHECKPOINTS))
def test_checkpoint_kind(kind, tmp_path, bad, user_error):
    weights = {"missing": lambda p: p, "text": bad.text_file, "other_architecture": bad.vit_2d_checkpoint}[kind](
        tmp_path / "weights" / "teacher_checkpoint.pth")
    out = tmp_path / "out"
    line = user_error(run(bad.good(tmp_path / "image.nii.gz"), out, weights=["--pretrained-weights", str(weights)]),
                      weights, outputs_in=(out, OUTPUTS))
    assert CHECKPOINTS[kind] in line, line
