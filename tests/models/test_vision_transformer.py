"""The 3D ViT backbone: factories, shapes, position embedding, masks, API contracts."""

import math

import pytest
import torch

from dinov2.models import MODEL_REGISTRY, VisionTransformer3D, build_model, vit_tiny_3d
from dinov2.models.vision_transformer import resample_pos_embed

FACTORY_SHAPES = {  # name: (embed_dim, depth, heads, ffn parameter name)
    "vit_tiny_3d": (64, 4, 4, "mlp.fc1.weight"),
    "vit_small_3d": (384, 12, 6, "mlp.fc1.weight"),
    "vit_base_3d": (768, 12, 12, "mlp.fc1.weight"),
    "vit_large_3d": (1024, 24, 16, "mlp.fc1.weight"),
    "vit_giant2_3d": (1536, 40, 24, "mlp.w12.weight"),
}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return vit_tiny_3d(img_size=32, patch_size=8).eval()


@pytest.mark.parametrize("name", sorted(FACTORY_SHAPES))
def test_every_factory_builds_with_its_shape_and_runs(name):
    dim, depth, heads, ffn_key = FACTORY_SHAPES[name]
    # The meta device gives real shapes without allocating gigabytes for the large models.
    with torch.device("meta"):
        model = build_model(name, img_size=96)
        out = model.forward_features(torch.empty(2, 1, 96, 96, 64))
    assert (model.embed_dim, model.depth, model.num_heads) == (dim, depth, heads)
    assert f"blocks.{depth - 1}.{ffn_key}" in model.state_dict()
    assert model.pos_embed.shape == (1, 1 + 6 ** 3, dim)
    assert out["x_norm_clstoken"].shape == (2, dim)
    assert out["x_norm_patchtokens"].shape == (2, 6 * 6 * 4, dim)
    assert out["x_prenorm"].shape == (2, 1 + 6 * 6 * 4, dim)


def test_registry_lists_every_factory_and_rejects_unknown_names():
    assert set(FACTORY_SHAPES) <= set(MODEL_REGISTRY)
    with pytest.raises(ValueError, match="Available"):
        build_model("vit_huge_2d")


@pytest.mark.parametrize("spatial", [(32, 32, 32), (48, 32, 16), (16, 40, 24)])
def test_anisotropic_inputs_give_matching_token_counts(tiny, spatial):
    with torch.no_grad():
        out = tiny.forward_features(torch.randn(2, 1, *spatial))
    n = math.prod(s // 8 for s in spatial)
    assert out["x_norm_patchtokens"].shape == (2, n, 64)
    assert torch.isfinite(out["x_norm_patchtokens"]).all()


def test_pos_embed_identity_at_native_grid(tiny):
    pos = tiny.interpolate_pos_encoding(tiny.patch_grid, torch.float32)
    assert torch.equal(pos, tiny.pos_embed)
    # The resampling itself (exact-size mode) is the identity when asked for the same grid.
    torch.testing.assert_close(resample_pos_embed(tiny.pos_embed, (4, 4, 4), (4, 4, 4)), tiny.pos_embed)


@pytest.mark.parametrize("offset", [0.0, 0.1])
def test_pos_embed_interpolation_is_trilinear_on_a_linear_field(offset):
    model = VisionTransformer3D(img_size=32, patch_size=8, embed_dim=3, depth=1, num_heads=1,
                                interpolate_offset=offset)
    with torch.no_grad():  # a constant field must stay constant after resampling
        model.pos_embed[:, 1:] = torch.tensor([1.0, -2.0, 0.5])
    pos = model.interpolate_pos_encoding((6, 2, 5), torch.float32)
    assert pos.shape == (1, 1 + 60, 3)
    torch.testing.assert_close(pos[0, 1:], torch.tensor([1.0, -2.0, 0.5]).expand(60, 3))
    # Downsampling along one axis by 2 with align_corners=False averages neighbour pairs.
    with torch.no_grad():
        model.pos_embed[:, 1:, 0] = torch.arange(4.0).repeat_interleave(16)  # varies along H only
    pos = model.interpolate_pos_encoding((2, 4, 4), torch.float32)[0, 1:, 0].reshape(2, 4, 4)
    if offset == 0.0:
        torch.testing.assert_close(pos[:, 0, 0], torch.tensor([0.5, 2.5]))
    else:  # DINOv2's +0.1 offset shifts the sampling positions slightly but keeps monotonicity
        assert pos[0, 0, 0] < pos[1, 0, 0]


def test_mask_token_replaces_masked_patches_only(tiny):
    x = torch.randn(2, 1, 32, 32, 32)
    masks = torch.zeros(2, 64, dtype=torch.bool)
    masks[0, [3, 10]] = True
    with torch.no_grad():
        tiny.mask_token.normal_()
        plain = tiny.prepare_tokens_with_masks(x)
        masked = tiny.prepare_tokens_with_masks(x, masks)
        pos = tiny.interpolate_pos_encoding(tiny.patch_grid, torch.float32)
    changed = (plain - masked).abs().sum(-1) > 0
    assert changed[0].nonzero().flatten().tolist() == [4, 11]  # +1 for the CLS token
    assert not changed[1].any()
    torch.testing.assert_close(masked[0, 4], tiny.mask_token[0] + pos[0, 4])
    out = tiny.forward_features(x, masks=masks)
    assert out["masks"] is masks


def test_forward_features_list_equals_separate_calls(tiny):
    xg, xl = torch.randn(2, 1, 32, 32, 32), torch.randn(3, 1, 16, 16, 16)
    masks = torch.rand(2, 64) > 0.5
    with torch.no_grad():
        together = tiny.forward_features_list([xg, xl], [masks, None])
        alone = [tiny.forward_features(xg, masks), tiny.forward_features(xl)]
    for a, b in zip(together, alone):
        for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


def test_intermediate_layers_by_count_and_by_index(tiny):
    x = torch.randn(2, 1, 32, 32, 24)
    with torch.no_grad():
        last2 = tiny.get_intermediate_layers(x, n=2)
        by_idx = tiny.get_intermediate_layers(x, n=[2, 3])
        first = tiny.get_intermediate_layers(x, n=[0], reshape=True, return_class_token=True, norm=False)
        feats = tiny.forward_features(x)
    assert len(last2) == 2
    for a, b in zip(last2, by_idx):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(last2[-1], feats["x_norm_patchtokens"])
    patches, cls = first[0]
    assert patches.shape == (2, 64, 4, 4, 3) and cls.shape == (2, 64)
    with torch.no_grad():
        manual = tiny.blocks[0](tiny.prepare_tokens_with_masks(x))
    torch.testing.assert_close(cls, manual[:, 0])
    # reshape=True puts token (h, w, d) at [:, :, h, w, d]
    torch.testing.assert_close(patches[:, :, 1, 2, 0], manual[:, 1 + 1 * 12 + 2 * 3 + 0])
    with pytest.raises(ValueError, match="out of range"):
        tiny.get_intermediate_layers(x, n=[4])


def test_last_self_attention_comes_from_last_block_and_sums_to_one(tiny):
    x = torch.randn(2, 1, 32, 32, 32)
    attn = tiny.get_last_self_attention(x)
    assert attn.shape == (2, 4, 64)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4))
    with torch.no_grad():
        tok = tiny.prepare_tokens_with_masks(x)
        for blk in tiny.blocks[:-1]:
            tok = blk(tok)
        _, full = tiny.blocks[-1].attn.forward_with_weights(tiny.blocks[-1].norm1(tok))
    expected = full[:, :, 0, 1:] / full[:, :, 0, 1:].sum(-1, keepdim=True)
    torch.testing.assert_close(attn, expected)
    assert tiny.get_last_self_attention(x, return_full=True).shape == (2, 4, 65, 65)


def test_register_tokens_are_separated_from_patches():
    model = vit_tiny_3d(img_size=32, patch_size=8, num_register_tokens=3).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        out = model.forward_features(x)
        inter = model.get_intermediate_layers(x, 1, return_class_token=True)
    assert out["x_norm_regtokens"].shape == (1, 3, 64)
    assert out["x_norm_patchtokens"].shape == (1, 64, 64)
    assert inter[0][0].shape == (1, 64, 64)
    assert model.get_last_self_attention(x).shape == (1, 4, 64)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = vit_tiny_3d(img_size=16, patch_size=8).train()
    x = torch.randn(2, 1, 16, 16, 16)
    model.forward_features(x)["x_norm_clstoken"].sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model.forward_features(x)["x_norm_clstoken"].sum().backward()
    for n, p in model.named_parameters():
        if n in ref:
            torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5)


def test_forward_returns_cls_or_dict(tiny):
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert tiny(x).shape == (1, 64)
        assert set(tiny(x, is_training=True)) >= {"x_norm_clstoken", "x_norm_patchtokens", "x_prenorm", "masks"}


def test_bad_arguments_raise_clear_errors(tiny):
    with pytest.raises(ValueError, match="divisible by num_heads"):
        vit_tiny_3d(embed_dim=66)
    with pytest.raises(ValueError, match="ffn_layer"):
        vit_tiny_3d(ffn_layer="relu")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny.forward_features(torch.randn(1, 1, 30, 32, 32))
    with pytest.raises(ValueError, match="masks cover"):
        tiny.forward_features(torch.randn(1, 1, 32, 32, 32), masks=torch.zeros(1, 10, dtype=torch.bool))
