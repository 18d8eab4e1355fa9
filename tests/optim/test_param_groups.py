"""Parameter groups: layer-wise LR decay, weight-decay exclusions, last-layer flag, fusion."""

import pytest
import torch
from torch import nn

from dinov2.optim.param_groups import apply_optim_scheduler, get_param_groups

RATE = 0.5  # a round decay makes the expected multipliers exact


def fake_model(shapes, frozen=()):
    """nn.Module whose named_parameters() are exactly the given dotted names."""
    root = nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(torch.zeros(shape), requires_grad=name not in frozen))
    return root


BACKBONE = {
    "cls_token": (1, 1, 4),
    "pos_embed": (1, 9, 4),
    "mask_token": (1, 4),
    "register_tokens": (1, 2, 4),
    "patch_embed.proj.weight": (4, 1, 2, 2, 2),
    "patch_embed.proj.bias": (4,),
    "blocks.0.attn.qkv.weight": (12, 4),
    "blocks.0.attn.qkv.bias": (12,),
    "blocks.0.ls1.gamma": (4,),
    "blocks.1.norm1.weight": (4,),
    "blocks.1.mlp.fc1.weight": (8, 4),
    "blocks.2.mlp.fc2.weight": (4, 8),
    "norm.weight": (4,),
    "norm.bias": (4,),
}
HEADS = {
    "dino_head.mlp.0.weight": (6, 4),
    "dino_head.mlp.0.bias": (6,),
    "dino_head.last_layer.weight_g": (10, 1),
    "dino_head.last_layer.weight_v": (10, 6),
    "ibot_head.last_layer.weight_v": (10, 6),
}

# (lr_multiplier, wd_multiplier, is_last_layer) by hand, for 3 blocks and RATE = 0.5:
# layer 0 -> 0.5 ** 4, block i -> 0.5 ** (3 - i), norm / heads -> 1; patch embed x 0.2.
EXPECTED = {
    "cls_token": (0.0625, 0.0, False),
    "pos_embed": (0.0625, 0.0, False),
    "mask_token": (0.0625, 0.0, False),
    "register_tokens": (0.0625, 0.0, False),
    "patch_embed.proj.weight": (0.0125, 1.0, False),
    "patch_embed.proj.bias": (0.0125, 0.0, False),
    "blocks.0.attn.qkv.weight": (0.125, 1.0, False),
    "blocks.0.attn.qkv.bias": (0.125, 0.0, False),
    "blocks.0.ls1.gamma": (0.125, 0.0, False),
    "blocks.1.norm1.weight": (0.25, 0.0, False),
    "blocks.1.mlp.fc1.weight": (0.25, 1.0, False),
    "blocks.2.mlp.fc2.weight": (0.5, 1.0, False),
    "norm.weight": (1.0, 0.0, False),
    "norm.bias": (1.0, 0.0, False),
}
EXPECTED_HEADS = {
    "dino_head.mlp.0.weight": (1.0, 1.0, False),
    "dino_head.mlp.0.bias": (1.0, 0.0, False),
    "dino_head.last_layer.weight_v": (1.0, 1.0, True),
    "ibot_head.last_layer.weight_v": (1.0, 1.0, True),
}


def multipliers_by_name(groups):
    out = {}
    for group in groups:
        for name in group["names"]:
            assert name not in out, f"{name} in two groups"
            out[name] = (pytest.approx(group["lr_multiplier"]), group["wd_multiplier"], group["is_last_layer"])
    return out


def test_meta_architecture_names():
    model = fake_model(
        {**{f"backbone.{k}": v for k, v in BACKBONE.items()}, **HEADS}, frozen={"dino_head.last_layer.weight_g"}
    )
    groups = get_param_groups(model, lr_decay_rate=RATE, patch_embed_lr_mult=0.2)
    expected = {**{f"backbone.{k}": v for k, v in EXPECTED.items()}, **EXPECTED_HEADS}
    assert multipliers_by_name(groups) == expected  # frozen weight_g is left out


def test_bare_backbone_names():
    groups = get_param_groups(fake_model(BACKBONE), lr_decay_rate=RATE, patch_embed_lr_mult=0.2)
    assert multipliers_by_name(groups) == EXPECTED


def test_chunked_block_names_use_global_index():
    shapes = {
        "backbone.blocks.0.0.attn.qkv.weight": (12, 4),
        "backbone.blocks.0.1.attn.qkv.weight": (12, 4),
        "backbone.blocks.1.2.attn.qkv.weight": (12, 4),
        "backbone.blocks.1.3.attn.qkv.weight": (12, 4),
    }
    groups = get_param_groups(fake_model(shapes), lr_decay_rate=RATE)
    got = {name: mult[0] for name, mult in multipliers_by_name(groups).items()}
    assert got == {
        "backbone.blocks.0.0.attn.qkv.weight": 0.5**4,
        "backbone.blocks.0.1.attn.qkv.weight": 0.5**3,
        "backbone.blocks.1.2.attn.qkv.weight": 0.5**2,
        "backbone.blocks.1.3.attn.qkv.weight": 0.5**1,
    }


def test_explicit_num_layers_and_fusion():
    model = fake_model({f"backbone.{k}": v for k, v in BACKBONE.items()})
    groups = get_param_groups(model, lr_decay_rate=RATE, num_layers=5)
    got = multipliers_by_name(groups)
    assert got["backbone.blocks.2.mlp.fc2.weight"][0] == 0.5**3  # (5 + 1) - (2 + 1)
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys))
    assert sum(len(g["params"]) for g in groups) == len(BACKBONE)
    with pytest.raises(ValueError, match="num_layers=1"):
        get_param_groups(model, num_layers=1)
    with pytest.raises(ValueError, match="lr_decay_rate"):
        get_param_groups(model, lr_decay_rate=0.0)


def test_apply_optim_scheduler():
    model = fake_model({f"backbone.{k}": v for k, v in BACKBONE.items()} | HEADS)
    optimizer = torch.optim.AdamW(get_param_groups(model, lr_decay_rate=RATE, patch_embed_lr_mult=0.2))
    apply_optim_scheduler(optimizer, lr=0.1, wd=0.04, last_layer_lr=0.0)
    for group in optimizer.param_groups:
        base = 0.0 if group["is_last_layer"] else 0.1
        assert group["lr"] == pytest.approx(base * group["lr_multiplier"])
        assert group["weight_decay"] == pytest.approx(0.04 * group["wd_multiplier"])
    last = [g for g in optimizer.param_groups if g["is_last_layer"]]
    assert last and all(g["lr"] == 0.0 for g in last)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(KeyError, match="get_param_groups"):
        apply_optim_scheduler(plain, lr=0.1, wd=0.04, last_layer_lr=0.1)


def test_published_recipe_decays_tokens_and_a_trained_prototype_norm():
    """optim.token_weight_decay / head_train_prototype_norm: tokens take weight decay, weight_g is a
    last-layer parameter (frozen with the prototypes at first) that takes weight decay."""
    model = fake_model({**{f"backbone.{k}": v for k, v in BACKBONE.items()}, **HEADS})
    got = multipliers_by_name(get_param_groups(model, lr_decay_rate=RATE, patch_embed_lr_mult=0.2, decay_tokens=True))
    for token in ("cls_token", "pos_embed", "mask_token", "register_tokens"):
        assert got[f"backbone.{token}"] == (pytest.approx(0.0625), 1.0, False)
    assert got["dino_head.last_layer.weight_g"] == (pytest.approx(1.0), 1.0, True)
    assert got["backbone.norm.weight"] == EXPECTED["norm.weight"]  # norms and biases still exempt
