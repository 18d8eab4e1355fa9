"""Segmentation heads: shapes, gradients, taps derived from depth, deformable attention sampling."""

from __future__ import annotations

import pytest
import torch

from dinov2.eval.segmentation.heads import MSDeformAttn3D, evenly_spaced_taps, last_taps
from dinov2.eval.segmentation.heads.ms_deform_attn3d import voxel_centres
from dinov2.eval.segmentation.model import build_segmentation_model
from dinov2.models import build_model
from dinov2.optim.param_groups import get_param_groups

HEAD_OPTIONS = {
    "UNETR": {"feature_size": 4},
    "ViTAdapterUNETR": {"feature_size": 4, "spm_width": 4, "n_points": 2},
    "Linear": {},
}


def tiny_backbone(depth: int, patch: int = 8, in_chans: int = 1):
    torch.manual_seed(0)
    return build_model("vit_tiny_3d", embed_dim=32, depth=depth, num_heads=2, patch_size=patch,
                       img_size=2 * patch, in_chans=in_chans)


@pytest.mark.parametrize("depth, expected", [(4, [0, 1, 2, 3]), (12, [2, 5, 8, 11]), (24, [5, 11, 17, 23]),
                                             (10, [1, 4, 6, 9])])
def test_taps_are_derived_from_depth(depth, expected):
    assert evenly_spaced_taps(depth) == expected
    if depth % 4 == 0:  # the rule for depths divisible by 4 (0-based depth//4*k - 1)
        assert expected == [depth // 4 * k - 1 for k in range(1, 5)]
    assert last_taps(depth) == list(range(depth - 4, depth))
    with pytest.raises(ValueError, match="distinct taps"):
        evenly_spaced_taps(3)


@pytest.mark.parametrize("head", ["UNETR", "ViTAdapterUNETR", "Linear"])
@pytest.mark.parametrize("depth", [4, 12, 24])
@pytest.mark.parametrize("channels", [1, 4])
def test_head_forward_backward(head, depth, channels):
    backbone = tiny_backbone(depth)
    model = build_segmentation_model(backbone, head, in_channels=channels, out_channels=3,
                                     head_options=HEAD_OPTIONS[head])
    expected_taps = last_taps(depth) if head == "Linear" else evenly_spaced_taps(depth)
    assert model.taps == expected_taps
    image = torch.randn(2, channels, 16, 16, 16)
    logits = model(image)
    assert logits.shape == (2, 3, 16, 16, 16)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.startswith(("head.", "merge.")) for n, _ in trainable), "frozen backbone must not train"
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(p.grad is None for p in model.backbone.parameters())
    if channels > 1:  # every modality went through the backbone: the merge learned from all of them
        assert model.num_modalities == channels
        if model.merge.proj:
            assert model.merge.proj[0].weight.grad.abs().sum() > 0


def test_finetuned_backbone_gets_layerwise_gradients():
    model = build_segmentation_model(tiny_backbone(4), "UNETR", 1, 2, HEAD_OPTIONS["UNETR"], train_backbone=True)
    model(torch.randn(1, 1, 16, 16, 16)).mean().backward()
    assert model.backbone.training
    assert model.backbone.blocks[0].attn.qkv.weight.grad is not None
    # Backbone parameters are named backbone.* so layer-wise LR decay applies to them.
    groups = get_param_groups(model, lr_decay_rate=0.5, patch_embed_lr_mult=1.0)
    lr_of = {name: g["lr_multiplier"] for g in groups for name in g["names"]}
    assert lr_of["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(0.5 ** 4)
    assert lr_of["backbone.blocks.3.attn.qkv.weight"] == pytest.approx(0.5)
    assert lr_of["head.out.conv.conv.weight"] == 1.0


def test_frozen_backbone_stays_in_eval_mode():
    model = build_segmentation_model(tiny_backbone(4), "Linear", 1, 2)
    model.train()
    assert model.head.training and not model.backbone.training


def test_adapter_stages_end_at_the_taps():
    """At initialisation (injector gamma = 0) the adapter's stage outputs are the plain tap features."""
    backbone = tiny_backbone(12)
    model = build_segmentation_model(backbone, "ViTAdapterUNETR", 1, 2, HEAD_OPTIONS["ViTAdapterUNETR"]).eval()
    image = torch.randn(1, 1, 16, 16, 16)
    seen = []
    original = model.merge_tokens
    model.merge_tokens = lambda patches, tap, grid: seen.append(original(patches, tap, grid)) or seen[-1]
    with torch.no_grad():
        model(image)
        reference = model.features(image)
    assert len(seen) == 4
    for got, ref in zip(seen, reference):
        torch.testing.assert_close(got, ref.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_unetr_rejects_non_power_of_two_patch():
    with pytest.raises(ValueError, match="power-of-two"):
        build_segmentation_model(tiny_backbone(4, patch=6), "UNETR", 1, 2)


def test_deformable_attention_samples_the_right_voxels():
    """Zero offsets, one point, identity projections: each query returns the value at its reference voxel.

    An anisotropic grid on two levels catches any axis-order mix-up between (H, W, D) and grid_sample.
    """
    torch.manual_seed(0)
    dim, heads = 6, 3
    attn = MSDeformAttn3D(dim, n_heads=heads, n_levels=2, n_points=1)
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.zero_()
        for lin in (attn.value_proj, attn.output_proj):
            lin.weight.copy_(torch.eye(dim))
            lin.bias.zero_()
    shapes = [(5, 3, 4), (2, 3, 1)]
    levels = [torch.randn(1, dim, *s) for s in shapes]
    value = torch.cat([lvl.flatten(2).transpose(1, 2) for lvl in levels], dim=1)
    # Query every voxel of level 0; level 1 gets its own nearest voxel centre via the per-level refs.
    ref0 = voxel_centres(shapes[0])
    idx1 = [torch.clamp((ref0[:, a] * shapes[1][a]).long(), max=shapes[1][a] - 1) for a in range(3)]
    ref1 = torch.stack([(idx1[a].float() + 0.5) / shapes[1][a] for a in range(3)], dim=-1)
    ref = torch.stack([ref0, ref1], dim=1)[None]  # (1, N, 2, 3)
    out = attn(torch.randn(1, ref0.shape[0], dim), ref, value, shapes)
    # Attention weights are uniform (zero init) over 2 levels x 1 point.
    expected = 0.5 * levels[0].flatten(2).transpose(1, 2) + 0.5 * levels[1][0][:, idx1[0], idx1[1], idx1[2]].T[None]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads, dim, shapes", [(1, 8, [(3, 4, 5)]), (5, 20, [(6, 2, 3), (3, 1, 2), (1, 1, 1)])])
def test_deformable_attention_any_heads_and_sizes(heads, dim, shapes):
    attn = MSDeformAttn3D(dim, n_heads=heads, n_levels=len(shapes), n_points=3)
    value = torch.randn(2, sum(h * w * d for h, w, d in shapes), dim, requires_grad=True)
    query = torch.randn(2, 7, dim, requires_grad=True)
    out = attn(query, torch.rand(2, 7, 1, 3), value, shapes)
    assert out.shape == (2, 7, dim)
    out.sum().backward()
    assert value.grad.abs().sum() > 0 and query.grad is not None
    with pytest.raises(ValueError, match="tokens"):
        attn(query, torch.rand(2, 7, 1, 3), value[:, 1:], shapes)
