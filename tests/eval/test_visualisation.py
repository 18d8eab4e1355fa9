"""python -m dinov2.eval.visualisation: outputs in the input's space, orthonormal PCA, last-block attention, 4D frames."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.checkpoints.teacher_export import save_teacher_checkpoint
from dinov2.eval.visualisation import run as vis_run
from dinov2.eval.visualisation.inputs import load_vis_volume, to_tensor
from dinov2.eval.visualisation.pca import fit_pca, scale_scores
from dinov2.eval.visualisation.tokens import compute_token_maps, to_voxels, token_fraction
from dinov2.models import build_model
from dinov2.sample_data import package_dir


def _nibabel_data(name: str) -> Path:
    path = package_dir("nibabel") / "tests" / "data" / name
    if not path.is_file():
        pytest.fail(f"{path} missing: nibabel's test data ship with the pinned nibabel wheel")
    return path


ANATOMICAL = _nibabel_data("anatomical.nii")  # real T1, (33, 41, 25), 2 mm, LAS
SERIES_4D = _nibabel_data("example4d.nii.gz")  # real fMRI, (128, 96, 24, 2), oblique-free, 2.2 mm slices


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("vit_tiny_3d", patch_size=8, img_size=16).eval()


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "teacher_checkpoint.pth"
    config = {"student": {"arch": "vit_tiny_3d", "patch_size": 8}, "crops": {"global_crops_size": 16}}
    return save_teacher_checkpoint(path, {f"backbone.{k}": v for k, v in tiny.state_dict().items()}, config, 0)


@pytest.fixture(scope="module")
def anisotropic(tmp_path_factory):
    """The real anatomical volume declared with 4 mm voxels along y: the model sees (x, z, y)."""
    image = nib.load(ANATOMICAL)
    affine = image.affine.copy()
    affine[:3, 1] *= 2.0
    path = tmp_path_factory.mktemp("aniso") / "anat_aniso.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), affine), path)
    return path


def _run(args: list[str]) -> int:
    return vis_run.main([str(a) for a in args])


@pytest.mark.parametrize("input_type,image", [("full_image", "anatomical"), ("resize", "anisotropic"),
                                              ("sliding_window", "anisotropic")])
def test_pca_outputs_are_in_the_input_space(input_type, image, anisotropic, tiny_checkpoint, tmp_path):
    source = ANATOMICAL if image == "anatomical" else anisotropic
    out = tmp_path / "vis"
    assert _run(["--pretrained-weights", tiny_checkpoint, "--image-path", source, "--output-dir", out,
                 "--vis-type", "pca", "--input-type", input_type, "--n-components", "4", "--image-size", "16"]) == 0
    reference = nib.load(source)
    summary = json.loads((out / "summary.json").read_text())
    files = summary["images"][0]["components"] + [summary["images"][0]["foreground"]]
    assert len(files) == 5 and len(summary["explained_variance_ratio"]) == 4
    for f in files:
        written = nib.load(f)
        assert written.shape == reference.shape
        np.testing.assert_allclose(written.affine, reference.affine, atol=1e-5)
    component = np.asarray(nib.load(files[1]).dataobj)
    assert component.min() >= 0 and component.max() <= 1 and component.std() > 0.01
    png = Image.open(summary["images"][0]["montage"])
    assert png.mode == "RGB" and png.width > 100 and png.height > 100


def test_4d_input_uses_the_chosen_frame_and_rejects_a_missing_one(tiny_checkpoint, tmp_path, error_line):
    common = ["--pretrained-weights", tiny_checkpoint, "--image-path", SERIES_4D, "--vis-type", "mhsa"]
    assert _run(common + ["--output-dir", tmp_path / "f0"]) == 0
    assert _run(common + ["--output-dir", tmp_path / "f1", "--frame", "1"]) == 0
    first = nib.load(tmp_path / "f0" / "example4d_frame0_attn_head0.nii.gz")
    second = nib.load(tmp_path / "f1" / "example4d_frame1_attn_head0.nii.gz")
    assert first.shape == second.shape == nib.load(SERIES_4D).shape[:3]
    np.testing.assert_allclose(first.affine, nib.load(SERIES_4D).affine, atol=1e-5)
    assert not np.allclose(np.asarray(first.dataobj), np.asarray(second.dataobj))
    assert len(list((tmp_path / "f1").glob("*_attn_head*.nii.gz"))) == 4  # one per head of vit_tiny_3d
    assert _run(common + ["--output-dir", tmp_path / "f9", "--frame", "9"]) == 1
    assert "has 2 frames" in error_line()


def test_pca_axes_are_orthonormal_and_ordered():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(300, 16, generator=g) @ torch.randn(16, 16, generator=g) + 3.0
    pca = fit_pca(tokens, 6)
    gram = pca.components @ pca.components.T
    torch.testing.assert_close(gram, torch.eye(6), atol=1e-5, rtol=0)
    scores = pca.transform(tokens)
    cov = torch.cov(scores.T.double())
    off_diagonal = cov - torch.diag(cov.diagonal())
    assert off_diagonal.abs().max() < 1e-4 * cov.diagonal().max()
    eigenvalues = torch.linalg.eigvalsh(torch.cov(tokens.T.double())).flip(0)[:6]
    torch.testing.assert_close(pca.explained_variance.double(), eigenvalues, rtol=1e-4, atol=1e-6)
    assert torch.all(pca.explained_variance[:-1] >= pca.explained_variance[1:])
    scaled, _, _ = scale_scores(scores, torch.ones(300, dtype=torch.bool))
    assert scaled.min() == 0 and scaled.max() == 1
    with pytest.raises(ValueError, match="n_components"):
        fit_pca(tokens[:5], 6)


def test_attention_sums_to_one_per_head_and_comes_from_the_last_block(tiny):
    volume = load_vis_volume(ANATOMICAL)
    maps = compute_token_maps(tiny, to_tensor(volume), volume.spacing, "full_image", features=False, attention=True)
    attention = maps.attention
    assert attention.shape == (4, *maps.geometry.grid) == (4, 5, 6, 4)
    torch.testing.assert_close(attention.flatten(1).sum(1), torch.ones(4), atol=1e-5, rtol=0)

    # Recompute by hand from the tokens entering the last block.
    captured = {}
    hook = tiny.blocks[-1].register_forward_pre_hook(lambda module, args: captured.update(x=args[0]))
    padded = torch.nn.functional.pad(to_tensor(volume), (0, 7, 0, 7, 0, 7), value=-1.0)  # (33, 41, 25) -> (40, 48, 32)
    with torch.no_grad():
        tiny.forward_features(padded)
    hook.remove()
    block = tiny.blocks[-1]
    with torch.no_grad():
        q, k, _ = block.attn.split_qkv(block.attn.qkv(block.norm1(captured["x"])))
        weights = torch.softmax(q * block.attn.scale @ k.transpose(-2, -1), dim=-1)[0, :, 0, 1:]
    expected = (weights / weights.sum(-1, keepdim=True)).reshape(4, 5, 6, 4)
    torch.testing.assert_close(attention, expected, atol=1e-5, rtol=1e-4)

    # Changing an earlier block changes the input of the last one; changing the last block's
    # query projection alone must change the maps too (they are not read from an earlier block).
    original = block.attn.qkv.weight.detach().clone()
    with torch.no_grad():
        block.attn.qkv.weight[:64] *= 3.0  # queries of every head
        changed = compute_token_maps(tiny, to_tensor(volume), volume.spacing, "full_image", features=False,
                                     attention=True).attention
        block.attn.qkv.weight.copy_(original)
    assert (changed - attention).abs().max() > 1e-4

    # Each voxel of the written maps carries its patch's weight.
    voxels = to_voxels(attention, maps.geometry, mode="nearest")
    assert voxels.shape == (4, 33, 41, 25)
    assert torch.equal(voxels[:, 8:16, 0:8, 16:24], attention[:, 1:2, 0:1, 2:3].expand(4, 8, 8, 8))


def test_token_maps_go_back_to_the_voxels_exactly(tiny):
    volume = load_vis_volume(ANATOMICAL)
    for input_type in ("full_image", "resize", "sliding_window"):
        maps = compute_token_maps(tiny, to_tensor(volume), volume.spacing, input_type, image_size=16)
        constant = torch.full((2, *maps.geometry.grid), 0.25)
        back = to_voxels(constant, maps.geometry)
        assert back.shape == (2, 33, 41, 25)
        torch.testing.assert_close(back, torch.full_like(back, 0.25))
        inside = token_fraction(torch.ones(33, 41, 25, dtype=torch.bool), maps.geometry)
        assert inside.shape == maps.geometry.grid and float(inside.max()) == pytest.approx(1.0)
    # sliding windows of the native size over a volume: same tokens as one pass where windows do not overlap
    full = compute_token_maps(tiny, to_tensor(volume), volume.spacing, "full_image").features
    windowed = compute_token_maps(tiny, to_tensor(volume), volume.spacing, "sliding_window", image_size=(40, 48, 32),
                                  overlap=0.0).features
    torch.testing.assert_close(windowed, full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("window,patch", [(16, 8), (24, 8), (96, 16), (112, 16)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.6, 0.9])
def test_sliding_windows_step_by_whole_patches(window, patch, overlap):
    from dinov2.eval.visualisation.tokens import _sliding_overlap

    (value,) = _sliding_overlap((window,), overlap, patch)
    step = int(window * (1.0 - value))  # what MONAI computes
    assert step % patch == 0 and patch <= step <= window


def test_joint_pca_over_two_images_with_pc0_background(anisotropic, tiny_checkpoint, tmp_path):
    out = tmp_path / "joint"
    assert _run(["--pretrained-weights", tiny_checkpoint, "--image-path", ANATOMICAL, anisotropic,
                 "--output-dir", out, "--n-components", "4", "--background", "pc0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [Path(i["image"]).name for i in summary["images"]] == ["anatomical.nii", "anat_aniso.nii.gz"]
    grids = [np.prod(i["token_grid"]) for i in summary["images"]]
    assert summary["fitted_tokens"] < sum(grids)  # only the tokens PC0 calls foreground
    for entry, source in zip(summary["images"], (ANATOMICAL, anisotropic)):
        mask = nib.load(entry["foreground"])
        assert mask.shape == nib.load(source).shape
        values = np.unique(np.asarray(mask.dataobj))
        assert set(values.tolist()) == {0.0, 1.0}


# ------------------------------------------------------------------- what --pretrained-weights takes
def _errors(capsys) -> list[str]:
    """The messages of the ``ERROR:`` lines the command printed to stderr."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line.removeprefix("ERROR: ") for line in err.splitlines() if line.startswith("ERROR:")]


def test_finetuned_segmentation_model_is_one_error_line(tmp_path, capsys):
    from dinov2.checkpoints.finetuned import save_finetuned
    from dinov2.eval.presets import DatasetPreset, load_preset
    from dinov2.eval.segmentation.model import build_segmentation_model

    preset = DatasetPreset.from_config(dict(load_preset("brain_tissue")))
    kwargs = {"patch_size": 8, "img_size": 16}
    model = build_segmentation_model(build_model("vit_tiny_3d", **kwargs), "UNETR", 1, preset.out_channels,
                                     {"feature_size": 4})
    best = save_finetuned(tmp_path / "best_model.pth", model, {"arch": "vit_tiny_3d", "kwargs": kwargs},
                          {"pretrained_weights": "out/teacher_checkpoint.pth"}, preset, 1, {"name": "d", "value": 0.5})
    assert _run(["--pretrained-weights", best, "--image-path", ANATOMICAL, "--output-dir", tmp_path / "o"]) == 1
    (error,) = _errors(capsys)
    assert "\n" not in error and error.startswith(f"{best} is a finetuned segmentation model")
    assert "finetuned from out/teacher_checkpoint.pth: pass that file with --pretrained-weights" in error


def test_random_init_baseline_needs_an_architecture_and_is_recorded(tmp_path, caplog, capsys):
    base = ["--pretrained-weights", "None", "--image-path", ANATOMICAL, "--n-components", "4"]
    assert _run(base + ["--output-dir", tmp_path / "a"]) == 1
    assert _errors(capsys) == ["--pretrained-weights none builds a random-init backbone, but no architecture was "
                               "given: set --arch (a registry name, e.g. vit_large_3d)."]
    caplog.clear()
    caplog.set_level(logging.INFO)
    out = tmp_path / "b"
    assert _run(base + ["--output-dir", out, "--arch", "vit_tiny_3d", "--backbone-kwarg", "patch_size=8"]) == 0
    assert "random-init baseline" in caplog.text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["random_init"] is True and summary["pretrained_weights"] == "None"
    assert summary["images"][0]["token_grid"] == [5, 6, 4]  # patch 8 on the (33, 41, 25) input, as asked
