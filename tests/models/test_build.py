"""Building backbones from a description (dinov2/models/build.py): config keys, names, random init."""

from __future__ import annotations

import pytest

from dinov2.utils.config import config_to_dict

from dinov2.models.build import (
    BackboneConfigError,
    backbone_kwargs_from_config,
    build_random_backbone,
    is_random_init,
    resolve_arch,
)


def test_config_keys_become_constructor_arguments():
    config = {"student": {"arch": "vit_tiny", "patch_size": [8, 8, 4], "layerscale": 1.0e-5, "drop_path_rate": 0.3},
              "crops": {"global_crops_size": [32, 32, 16]}}
    arch, kwargs = backbone_kwargs_from_config(config)
    assert arch == "vit_tiny_3d"
    assert kwargs == {"patch_size": (8, 8, 4), "init_values": 1.0e-5, "img_size": (32, 32, 16)}


def test_width_depth_and_heads_come_from_the_training_config():
    # The packaged config lists them as null (the factory's own); a value there or on the command
    # line reaches the backbone, and build_model then makes a network of that width and depth.
    from dinov2.models.registry import build_model
    from dinov2.train.train3d import build_config

    cfg = build_config(None, ["student.arch=vit_tiny_3d", "student.patch_size=8", "crops.global_crops_size=16",
                              "train.datalist=d.json"])
    arch, kwargs = backbone_kwargs_from_config(config_to_dict(cfg))
    assert not {"embed_dim", "depth", "num_heads", "mlp_ratio"} & set(kwargs)
    assert build_model(arch, **kwargs).embed_dim == 64
    cfg = build_config(None, ["student.arch=vit_tiny_3d", "student.patch_size=8", "crops.global_crops_size=16",
                              "student.embed_dim=96", "student.depth=2", "student.num_heads=3", "train.datalist=d.json"])
    arch, kwargs = backbone_kwargs_from_config(config_to_dict(cfg))
    model = build_model(arch, **kwargs)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (96, 2, 3)


def test_heads_that_do_not_divide_the_width_name_the_keys():
    from dinov2.models.build import build_configured_backbone

    with pytest.raises(BackboneConfigError, match=r"run\.yaml: .*student\.embed_dim and student\.num_heads"):
        build_configured_backbone("vit_tiny_3d", {"embed_dim": 96, "num_heads": 5}, "run.yaml")


def test_configs_without_a_buildable_architecture_name_the_file():
    with pytest.raises(BackboneConfigError, match=r"t\.pth: the embedded config has no student\.arch"):
        backbone_kwargs_from_config({"crops": {}}, "t.pth")
    with pytest.raises(ValueError, match="unknown architecture 'vit_nope'. Available: .*vit_tiny_3d"):
        resolve_arch("vit_nope")


def test_random_init_names_and_builder():
    assert all(is_random_init(v) for v in ("none", "None", "NONE", " none "))
    assert not any(is_random_init(v) for v in (None, "", "none.pth", "teacher_checkpoint.pth"))
    model, kwargs = build_random_backbone("vit_tiny", {"patch_size": 8}, img_size=16)
    assert kwargs == {"arch": "vit_tiny_3d", "patch_size": 8, "img_size": 16} and model.patch_grid == (2, 2, 2)
    with pytest.raises(ValueError, match=r"no architecture was given: set --arch \(a registry name"):
        build_random_backbone(None)
    with pytest.raises(ValueError, match="Unknown architecture 'vit_nope' .*vit_tiny_3d"):
        build_random_backbone("vit_nope")
