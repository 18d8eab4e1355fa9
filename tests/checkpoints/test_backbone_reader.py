"""Checkpoint loading: published 3DINO-ViT layout, our teacher file, prefixes, resizing, errors."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dinov2.checkpoints import (
    CheckpointError,
    build_model_from_checkpoint,
    load_head_state_dicts,
    load_pretrained_backbone,
    normalize_state_dict_keys,
    save_teacher_checkpoint,
    to_published_layout,
)
from dinov2.models import vit_large_3d, vit_small_3d, vit_tiny_3d

MANIFEST = Path("formats") / "3dino_vit_teacher_checkpoint.json"


@pytest.fixture(scope="module")
def manifest() -> dict:
    """The published checkpoint's key -> shape table from the shared folder beside the repo."""
    candidates = [Path(__file__).parents[2].parent / "shared" / MANIFEST]
    if os.environ.get("DINOV2_SHARED_DIR"):
        candidates.append(Path(os.environ["DINOV2_SHARED_DIR"]) / MANIFEST)
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        pytest.skip(f"checkpoint manifest not found at {[str(p) for p in candidates]}; "
                    "set DINOV2_SHARED_DIR to the folder holding formats/")
    return json.loads(found.read_text())


@pytest.fixture
def ram_tmp_path(tmp_path):
    """A temporary folder in RAM (/dev/shm) when it has room: writing the 1.4 GB ViT-L file to
    disk would dominate the test's run time on slow CI disks."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 3 * 2**30):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=shm, prefix="dinov2_ckpt_test_") as folder:
        yield Path(folder)


def random_model(factory, seed: int = 0, **kwargs):
    """A model with deterministic non-trivial weights, built without the slow random init.

    Windows of one shared random pool (cheap to copy) fill every parameter; LayerNorm weights
    stay near 1 and LayerScale near 0.1 so every block changes the features.
    """
    with torch.device("meta"):
        model = factory(**kwargs)
    model.to_empty(device="cpu")
    largest = max(p.numel() for p in model.parameters())
    pool = torch.randn(2 * largest, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            start = (i * 7919 + seed * 104729) % largest
            values = pool[start:start + p.numel()].view_as(p)
            if name.endswith("gamma"):
                p.copy_(0.1 + 0.05 * values)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * values)
            else:
                p.copy_(0.02 * values)
    return model.eval()


def features(model, shape, seed: int = 1) -> dict[str, torch.Tensor]:
    x = torch.randn(1, model.in_chans, *shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval().forward_features(x)


def assert_same_features(a, b, shape) -> None:
    fa, fb = features(a, shape), features(b, shape)
    for key in ("x_prenorm", "x_norm_clstoken", "x_norm_patchtokens"):
        torch.testing.assert_close(fa[key], fb[key], rtol=0, atol=1e-6, msg=key)


def head_tensors(manifest: dict, scale: dict[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Random head tensors named as in the manifest; ``scale`` maps manifest sizes to smaller ones."""
    gen = torch.Generator().manual_seed(3)
    scale = scale or {}
    return {k: torch.randn([scale.get(s, s) for s in shape], generator=gen)
            for k, shape in manifest["keys"].items() if not k.startswith("backbone.")}


# ----------------------------------------------------------------------------- published layout
def test_vit_large_in_published_layout_matches_manifest_and_reproduces_features(ram_tmp_path, manifest):
    src = random_model(vit_large_3d, img_size=112)
    teacher = to_published_layout(src.state_dict(), block_chunks=4)
    teacher.update(head_tensors(manifest))
    assert {k: list(v.shape) for k, v in teacher.items()} == manifest["keys"]
    assert {v.dtype for v in teacher.values()} == {getattr(torch, manifest["dtype"])}
    path = ram_tmp_path / "3dino_vit_l.pth"
    torch.save({"teacher": teacher}, path)

    model, report = load_pretrained_backbone(path)
    assert report.source_format == "3dino_published" and report.chunked_blocks and report.built_from == "shapes"
    assert report.missing_keys == [] and report.unexpected_keys == [] and report.resized_keys == {}
    assert (model.embed_dim, model.depth, model.num_heads, model.patch_grid) == (1024, 24, 16, (7, 7, 7))
    assert report.non_backbone_keys == sorted(k for k in manifest["keys"] if not k.startswith("backbone."))
    assert torch.equal(report.head_state_dicts["ibot_head"]["last_layer.weight_g"],
                       teacher["ibot_head.last_layer.weight_g"])
    loaded = model.state_dict()
    for key, value in src.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert_same_features(model, src, (32, 32, 32))


def test_reduced_depth_published_layout_reproduces_features_at_native_grid(tmp_path, manifest):
    src = random_model(vit_small_3d, img_size=112, depth=4)
    teacher = to_published_layout(src.state_dict(), block_chunks=4)
    teacher.update(head_tensors(manifest, {1024: 384, 2048: 32, 256: 16, 65536: 64}))
    block_params = {re.sub(r"^backbone\.blocks\.\d+\.\d+\.", "", k) for k in manifest["keys"] if ".blocks." in k}
    assert {k for k in teacher if k.startswith("backbone.blocks.")} == {
        f"backbone.blocks.{i}.{i}.{p}" for i in range(4) for p in block_params}  # 4 chunks of 1 block
    assert {k for k in teacher if ".blocks." not in k} == {k for k in manifest["keys"] if ".blocks." not in k}
    path = tmp_path / "reduced.pth"
    torch.save({"teacher": teacher}, path)

    model, report = load_pretrained_backbone(path)
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert (model.depth, model.num_heads, model.patch_grid) == (4, 6, (7, 7, 7))
    assert_same_features(model, src, (112, 112, 112))
    assert set(load_head_state_dicts(path)) == {"dino_head", "ibot_head"}


# ----------------------------------------------------------------------------- our teacher file
def test_own_teacher_checkpoint_rebuilds_the_backbone_from_the_file_alone(tmp_path):
    cfg = OmegaConf.create({
        "student": {"arch": "vit_tiny", "patch_size": 8, "in_chans": 2, "layerscale": 1.0e-5,
                    "ffn_layer": "swiglufused", "num_register_tokens": 2, "drop_path_rate": 0.3},
        "crops": {"global_crops_size": [32, 32, 24]},  # anisotropic native grid (4, 4, 3)
        "optim": {"lr": 1.0e-3},
    })
    src = random_model(vit_tiny_3d, img_size=(32, 32, 24), patch_size=8, in_chans=2,
                       ffn_layer="swiglufused", num_register_tokens=2)
    teacher = {f"module.backbone.{k}": v for k, v in src.state_dict().items()}
    teacher["dino_head.mlp.0.weight"] = torch.randn(16, 64)
    path = tmp_path / "eval" / "training_123" / "teacher_checkpoint.pth"
    save_teacher_checkpoint(path, teacher, cfg, iteration=123)

    assert os.listdir(path.parent) == ["teacher_checkpoint.pth"]  # no temporary file left
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == 1 and raw["iteration"] == 123
    assert raw["config"] == OmegaConf.to_container(cfg) and type(raw["config"]) is dict
    assert all(k.startswith(("backbone.", "dino_head.")) for k in raw["teacher"])

    model = build_model_from_checkpoint(path)
    assert not model.training and model.num_register_tokens == 2 and model.patch_grid == (4, 4, 3)
    assert all(block.drop_path == 0.0 for block in model.blocks)  # the teacher had no stochastic depth
    assert_same_features(model, src, (32, 32, 24))

    # Another native size: the config tells the non-cubic source grid, so resizing works.
    model, report = load_pretrained_backbone(path, img_size=40)
    assert report.source_format == "dinov2_3d_teacher_v1" and report.built_from == "config"
    assert report.iteration == 123 and report.config["optim"]["lr"] == 1.0e-3
    assert report.resized_keys == {"pos_embed": ((1, 49, 64), (1, 126, 64))}
    assert list(report.head_state_dicts["dino_head"]) == ["mlp.0.weight"]
    assert_same_features(model, src, (40, 40, 40))


def test_packaged_config_rebuilds_the_backbone_the_trainer_builds(tmp_path):
    """Contract with dinov2.train: the keys we read are the ones the trainer builds its teacher from."""
    from dinov2.train.ssl_meta_arch import backbone_from_config  # noqa: PLC0415 - cross-room contract
    from dinov2.utils.config import load_yaml, packaged_config_path  # noqa: PLC0415

    cfg = OmegaConf.merge(load_yaml(packaged_config_path("data_defaults")),
                          load_yaml(packaged_config_path("ssl3d_default_config")),
                          OmegaConf.from_dotlist(["student.arch=vit_tiny_3d", "crops.global_crops_size=32",
                                                  "student.num_register_tokens=1"]))
    with torch.device("meta"):
        reference = backbone_from_config(cfg, teacher=True)
    src = random_model(vit_tiny_3d, img_size=32, num_register_tokens=1)
    assert {k: v.shape for k, v in src.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    path = save_teacher_checkpoint(tmp_path / "teacher_checkpoint.pth",
                                   {f"backbone.{k}": v for k, v in src.state_dict().items()}, cfg, iteration=0)
    model = build_model_from_checkpoint(path)
    for attr in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                 "num_register_tokens", "interpolate_offset"):
        assert getattr(model, attr) == getattr(reference, attr), attr
    assert [b.drop_path for b in model.blocks] == [b.drop_path for b in reference.blocks]
    assert_same_features(model, src, (32, 32, 32))


# ----------------------------------------------------------------------------- resizing
@pytest.mark.parametrize("ckpt_size, model_size", [(112, 96), (96, 112)])
@pytest.mark.parametrize("give_model", [False, True])
def test_pos_embed_resized_on_load_equals_runtime_interpolation(tmp_path, caplog, ckpt_size, model_size,
                                                                give_model):
    src = random_model(vit_tiny_3d, img_size=ckpt_size, depth=2)
    path = tmp_path / "plain.pth"
    torch.save(src.state_dict(), path)
    caplog.set_level(logging.INFO, logger="dinov2.checkpoints.backbone_reader")
    if give_model:
        model, report = load_pretrained_backbone(path, model=vit_tiny_3d(img_size=model_size, depth=2))
    else:
        model, report = load_pretrained_backbone(path, img_size=model_size)
    grid = model_size // 16
    assert model.patch_grid == (grid,) * 3 and report.source_format == "plain_state_dict"
    assert report.resized_keys == {"pos_embed": ((1, 1 + (ckpt_size // 16) ** 3, 64), (1, 1 + grid ** 3, 64))}
    assert str(path) in caplog.text and "Resized pos_embed" in caplog.text
    # src interpolates its own embedding at run time for this input; the loaded model must agree.
    assert_same_features(model, src, (model_size,) * 3)


# ----------------------------------------------------------------------------- prefixes / wrappers
def _prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


@pytest.mark.parametrize("layout, prefixes", [
    ("ddp", ["module."]),
    ("compiled", ["_orig_mod."]),
    ("ddp_compiled_meta", ["_orig_mod.", "module.", "backbone."]),
    ("model", []),
    ("state_dict_ddp", ["module."]),
    ("training_checkpoint", ["backbone."]),
    ("meta_arch_state_dict", ["teacher.", "backbone."]),
])
def test_wrappers_and_prefixes_are_handled_and_the_teacher_wins(tmp_path, layout, prefixes):
    teacher = random_model(vit_tiny_3d, seed=0, img_size=32, depth=2).state_dict()
    student = random_model(vit_tiny_3d, seed=5, img_size=32, depth=2).state_dict()
    obj = {
        "ddp": lambda: _prefixed(teacher, "module."),
        "compiled": lambda: _prefixed(teacher, "_orig_mod."),
        "ddp_compiled_meta": lambda: {**_prefixed(teacher, "module._orig_mod.backbone."),
                                      "module._orig_mod.dino_head.mlp.0.weight": torch.zeros(2)},
        "model": lambda: {"model": teacher, "epoch": 3},
        "state_dict_ddp": lambda: {"state_dict": _prefixed(teacher, "module.")},
        "training_checkpoint": lambda: {"student": _prefixed(student, "backbone."), "iteration": 7,
                                        "teacher": _prefixed(teacher, "backbone."), "optimizer": {"lr": 1}},
        "meta_arch_state_dict": lambda: {"model": {**_prefixed(student, "student.backbone."),
                                                   **_prefixed(teacher, "teacher.backbone.")}},
    }[layout]()
    path = tmp_path / f"{layout}.pth"
    torch.save(obj, path)
    model, report = load_pretrained_backbone(path, model=vit_tiny_3d(img_size=32, depth=2))
    assert report.stripped_prefixes == prefixes and report.missing_keys == []
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in teacher.items())


def test_normalize_unchunks_blocks_and_rejects_collisions():
    sd = {"backbone.blocks.1.6.norm1.weight": 1, "blocks.0.norm1.weight": 2, "module.cls_token": 3}
    out, stripped, chunked = normalize_state_dict_keys(sd)
    assert out == {"backbone.blocks.6.norm1.weight": 1, "blocks.0.norm1.weight": 2, "cls_token": 3}
    assert stripped == ["module."] and chunked
    with pytest.raises(CheckpointError, match="twice"):
        normalize_state_dict_keys({"blocks.0.3.w": 1, "blocks.1.3.w": 2})


def test_arch_by_name_and_unknown_width(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(random_model(vit_tiny_3d, img_size=32).state_dict(), path)
    model, report = load_pretrained_backbone(path, arch="vit_tiny")
    assert report.model_kwargs["arch"] == "vit_tiny_3d" and model.depth == 4
    odd = tmp_path / "odd.pth"
    torch.save(random_model(vit_tiny_3d, img_size=32, embed_dim=48, num_heads=3, depth=1).state_dict(), odd)
    with pytest.raises(CheckpointError, match=re.escape(str(odd)) + ".*arch="):
        load_pretrained_backbone(odd)


# ----------------------------------------------------------------------------- errors
def test_missing_file_names_path_and_option(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path)) + ".*--pretrained-weights"):
        load_pretrained_backbone(path)


@pytest.mark.parametrize("kind", ["text", "nifti", "truncated", "foreign_zip"])
def test_files_that_are_not_checkpoints(tmp_path, kind):
    path = tmp_path / f"bad_{kind}"
    if kind == "text":
        path.write_text("teacher: not a checkpoint\n")
        expected = "not a PyTorch checkpoint .it is a text file"
    elif kind == "nifti":
        path = tmp_path / "volume.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), path)
        expected = "not a PyTorch checkpoint .it is gzip-compressed"
    elif kind == "truncated":
        torch.save({"cls_token": torch.zeros(1, 1, 64)}, path)
        path.write_bytes(path.read_bytes()[:200])
        expected = "not a PyTorch checkpoint .it starts like a torch.save archive but is truncated"
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "a zip, not a checkpoint")
        expected = "Could not read checkpoint"
    with pytest.raises(CheckpointError, match=expected) as info:
        load_pretrained_backbone(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("give_model", [False, True])
def test_dict_without_backbone_keys(tmp_path, give_model):
    path = tmp_path / "segmenter.pth"
    torch.save({"state_dict": {"decoder.conv.weight": torch.zeros(2, 2)}}, path)
    model = vit_tiny_3d(img_size=32, depth=1) if give_model else None
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*no backbone keys"):
        load_pretrained_backbone(path, model=model)


def test_shape_mismatch_lists_the_tensors(tmp_path):
    path = tmp_path / "one_channel.pth"
    torch.save(random_model(vit_tiny_3d, img_size=32, depth=1).state_dict(), path)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + r".*patch_embed\.proj\.weight: "
                       r"checkpoint \[64, 1, 16, 16, 16\] vs model \[64, 2, 16, 16, 16\]"):
        load_pretrained_backbone(path, model=vit_tiny_3d(img_size=32, depth=1, in_chans=2))


def test_missing_and_unexpected_backbone_keys(tmp_path):
    src = random_model(vit_tiny_3d, img_size=32, depth=2)
    sd = {k: v for k, v in src.state_dict().items() if k != "norm.weight" and not k.startswith("blocks.1.")}
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + r".*missing blocks\.1\.\* \(14 tensors\), norm\.weight"):
        load_pretrained_backbone(path, model=vit_tiny_3d(img_size=32, depth=2))
    fresh = vit_tiny_3d(img_size=32, depth=2)
    model, report = load_pretrained_backbone(path, model=fresh, strict_backbone=False)
    assert report.missing_keys == sorted(set(src.state_dict()) - set(sd))
    assert torch.equal(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    built, report = load_pretrained_backbone(path, arch="vit_tiny_3d", strict_backbone=False)
    assert "blocks.3.mlp.fc1.weight" in report.missing_keys
    assert torch.isfinite(built.blocks[3].mlp.fc1.weight).all()  # initialised, not left empty

    torch.save(src.state_dict(), path)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + r".*unexpected blocks\.1\.\* \(14 tensors\)"):
        load_pretrained_backbone(path, model=vit_tiny_3d(img_size=32, depth=1))


def test_unsafe_pickles_are_refused_unless_trusted(tmp_path):
    sd = random_model(vit_tiny_3d, img_size=32, depth=1).state_dict()
    path = tmp_path / "with_args.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*weights_only=False"):
        load_pretrained_backbone(path)
    model, _ = load_pretrained_backbone(path, weights_only=False)
    assert torch.equal(model.cls_token, sd["cls_token"])


def test_newer_format_and_bad_arguments(tmp_path):
    path = tmp_path / "future.pth"
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 64)}, "format_version": 99}, path)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*format_version 99"):
        load_pretrained_backbone(path)
    with pytest.raises(ValueError, match="arch and img_size"):
        load_pretrained_backbone(path, model=vit_tiny_3d(img_size=32, depth=1), img_size=32)


def _finetune_outputs(out_dir: Path, teacher: Path | str, train_backbone: bool = False) -> tuple[Path, Path]:
    """best_model.pth and last_checkpoint.pth as segmentation finetuning writes them (its own writers, tiny model)."""
    from dinov2.checkpoints.finetuned import save_finetuned
    from dinov2.eval.presets import DatasetPreset, load_preset
    from dinov2.eval.segmentation.model import build_segmentation_model
    from dinov2.eval.segmentation.train_loop import resumable_weights

    kwargs = {"patch_size": 8, "img_size": 16}
    preset = DatasetPreset.from_config(dict(load_preset("brain_tissue")))
    model = build_segmentation_model(vit_tiny_3d(**kwargs), "UNETR", preset.in_channels, preset.out_channels,
                                     {"feature_size": 4}, train_backbone=train_backbone)
    config = {"pretrained_weights": str(teacher),
              "model": {"head": "UNETR", "train_backbone": train_backbone, "unetr": {"feature_size": 4}}}
    out_dir.mkdir(parents=True, exist_ok=True)
    best = save_finetuned(out_dir / "best_model.pth", model, {"arch": "vit_tiny_3d", "kwargs": kwargs}, config,
                          preset, 1, {"name": "dice", "value": 0.5})
    last = out_dir / "last_checkpoint.pth"
    torch.save({"model": resumable_weights(model, str(teacher)), "frozen_from": str(teacher), "optimizer": {},
                "state": {"iteration": 1}}, last)
    return best, last


def test_finetuned_segmentation_model_is_named_with_the_teacher_it_came_from(tmp_path):
    teacher = tmp_path / "teacher_checkpoint.pth"
    best, last = _finetune_outputs(tmp_path / "seg", teacher)
    snippet = ("To use the finetuned backbone itself (the 'backbone.' keys of {best}), in Python: from "
               "dinov2.checkpoints import load_finetuned; backbone = load_finetuned('{best}')[0].backbone")
    with pytest.raises(CheckpointError) as err:
        load_pretrained_backbone(best)
    assert str(err.value) == (
        f"{best} is a finetuned segmentation model (best_model.pth of python -m dinov2.eval.segmentation), not a "
        f"backbone/teacher checkpoint. Its backbone was finetuned from {teacher}: pass that file with "
        "--pretrained-weights. " + snippet.format(best=best))
    with pytest.raises(CheckpointError) as err:
        load_pretrained_backbone(last)
    assert str(err.value) == (
        f"{last} is the resumable state of a segmentation finetuning run (last_checkpoint.pth), not a "
        f"backbone/teacher checkpoint. Its backbone was finetuned from {teacher}: pass that file with "
        "--pretrained-weights. " + snippet.format(best=best))
    # The snippet works: it returns the finetuned backbone.
    from dinov2.checkpoints import load_finetuned
    assert load_finetuned(best)[0].backbone.depth == 4


def test_finetuned_segmentation_model_of_a_trained_or_random_backbone(tmp_path):
    best, _ = _finetune_outputs(tmp_path / "trained", tmp_path / "t.pth", train_backbone=True)
    with pytest.raises(CheckpointError, match=re.escape(f"finetuned from {tmp_path / 't.pth'}: pass that file with "
                                                        "--pretrained-weights (the finetuned run also trained")):
        load_pretrained_backbone(best)
    best, last = _finetune_outputs(tmp_path / "random", "none")
    for path in (best, last):
        with pytest.raises(CheckpointError, match=re.escape(
                "Its backbone was randomly initialised (--pretrained-weights none): no teacher checkpoint lies behind "
                "it. Pass a teacher_checkpoint.pth, or --pretrained-weights none for the random-init baseline.")):
            load_pretrained_backbone(path)
