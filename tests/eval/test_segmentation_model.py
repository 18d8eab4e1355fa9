"""The finetuning backbone: from our teacher checkpoint, the published layout, or random init."""

from __future__ import annotations

import pytest
import torch

from dinov2.checkpoints.teacher_export import save_teacher_checkpoint, to_published_layout
from dinov2.eval.segmentation.model import backbone_from_spec, build_backbone
from dinov2.models import build_model

TINY = dict(embed_dim=64, depth=4, num_heads=4, patch_size=8)  # 64 wide: a size whose head count is known


def teacher_state(backbone):
    return {f"backbone.{k}": v for k, v in backbone.state_dict().items()}


@pytest.mark.parametrize("layout", ["ours", "published"])
def test_backbone_from_teacher_checkpoint(tmp_path, layout):
    torch.manual_seed(0)
    source = build_model("vit_tiny_3d", img_size=16, **TINY)
    path = tmp_path / "teacher_checkpoint.pth"
    if layout == "ours":
        config = {"student": {"arch": "vit_tiny_3d", **TINY}, "crops": {"global_crops_size": 16}}
        save_teacher_checkpoint(path, teacher_state(source), config, iteration=5)
    else:  # chunked blocks, no config: the architecture is inferred from tensor shapes
        torch.save({"teacher": to_published_layout(source.state_dict())}, path)
    backbone, spec = build_backbone(str(path), "ignored_arch", None, img_size=(32, 32, 16))
    assert backbone.img_size == (32, 32, 16)  # position embedding resampled once, to the crop
    torch.testing.assert_close(backbone.blocks[3].mlp.fc2.weight, source.blocks[3].mlp.fc2.weight)
    rebuilt = backbone_from_spec(spec)
    rebuilt.load_state_dict(backbone.state_dict())  # the spec rebuilds exactly this architecture
    x = torch.randn(1, 1, 32, 32, 16)
    torch.testing.assert_close(rebuilt.eval()(x), backbone.eval()(x))


def test_random_init_is_explicit_and_wrong_paths_fail(tmp_path):
    backbone, spec = build_backbone("none", "vit_tiny_3d", TINY, img_size=16)
    assert spec == {"arch": "vit_tiny_3d", "kwargs": {**TINY, "img_size": 16}}
    assert backbone.depth == 4
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone(str(tmp_path / "nope.pth"), "vit_tiny_3d")


def test_none_is_case_insensitive_and_agrees_with_the_training_loop():
    from dinov2.eval.segmentation.model import no_weights

    backbone, spec = build_backbone("NONE", "vit_tiny", TINY, img_size=16)
    assert spec["arch"] == "vit_tiny_3d" and backbone.depth == 4
    # resumable_weights() asks no_weights(): it must keep a frozen random backbone for every spelling.
    assert all(no_weights(v) for v in ("none", "None", "NONE", ""))
    assert not any(no_weights(v) for v in ("teacher_checkpoint.pth", None))
    with pytest.raises(ValueError, match=r"set model.arch=<registry name>"):
        build_backbone("none", None)
