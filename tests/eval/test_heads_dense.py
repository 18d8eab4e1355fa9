"""The dense heads (DinoUNet, DPT, UNetFusion): shapes for any depth / patch / channels, gradients,
taps, a few optimisation steps, deep supervision, the DPT read-out, options and errors."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss
from omegaconf import OmegaConf

from dinov2.eval.segmentation.heads import evenly_spaced_taps
from dinov2.eval.segmentation.heads.dino_unet import decoder_widths
from dinov2.eval.segmentation.model import (HEAD_NAMES, build_head, build_segmentation_model, canonical_head_name,
                                            head_options)
from dinov2.eval.segmentation.train_loop import supervised_loss
from dinov2.models import build_model
from dinov2.utils.config import packaged_config_path

pytestmark = pytest.mark.usefixtures("one_thread")

DENSE_HEADS = ("DinoUNet", "DPT", "UNetFusion")
TINY_OPTIONS = {  # tiny widths so every case runs in a fraction of a second
    "DinoUNet": {"widths": [4, 8, 8, 8], "rank": 8, "spm_width": 4, "n_points": 2},
    "DPT": {"widths": [4, 8, 8, 8], "fusion_width": 8, "head_width": 4},
    "UNetFusion": {"width": 8},
}
SIDE = 32  # a multiple of every head's requirement (DPT: lcm(32, p); DinoUNet: lcm(16, p))


def tiny_backbone(depth: int = 4, patch: int = 8):
    torch.manual_seed(0)
    return build_model("vit_tiny_3d", embed_dim=32, depth=depth, num_heads=2, patch_size=patch, img_size=2 * patch)


def tiny_model(head: str, depth: int = 4, patch: int = 8, channels: int = 1, classes: int = 3, **kwargs):
    options = {**TINY_OPTIONS[head], **kwargs.pop("options", {})}
    return build_segmentation_model(tiny_backbone(depth, patch), head, channels, classes, options, **kwargs)


@pytest.mark.parametrize("head", DENSE_HEADS)
@pytest.mark.parametrize("depth", [4, 12, 24])
@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("patch", [8, 16])
def test_shape_taps_and_frozen_backbone(head, depth, channels, patch):
    model = tiny_model(head, depth, patch, channels)
    assert model.taps == evenly_spaced_taps(depth)
    logits = model(torch.randn(1, channels, SIDE, SIDE, SIDE))
    assert logits.shape == (1, 3, SIDE, SIDE, SIDE) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    assert all(p.grad is None for p in model.backbone.parameters()), "a frozen backbone gets no gradient"
    missing = [n for n, p in model.head.named_parameters() if p.grad is None]
    assert not missing, f"head parameters without gradient: {missing[:5]}"
    if channels > 1 and model.merge.proj:  # every modality went through the backbone and the learned merge
        assert model.merge.proj[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("head", DENSE_HEADS)
def test_finetuned_backbone_gets_gradients(head):
    model = tiny_model(head, train_backbone=True)
    model(torch.randn(1, 1, SIDE, SIDE, SIDE)).mean().backward()
    assert model.backbone.training
    for block in (model.backbone.blocks[0], model.backbone.blocks[-1]):
        assert block.attn.qkv.weight.grad is not None and block.attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("head", DENSE_HEADS)
def test_a_few_steps_lower_the_dice_ce_loss(head):
    """A bright cube (class 1) in noise: 8 Adam steps lower DiceCE (DinoUNet with deep supervision)."""
    options = {"deep_supervision": True} if head == "DinoUNet" else {}
    model = tiny_model(head, classes=2, options=options).train()
    gen = torch.Generator().manual_seed(0)
    image = 0.1 * torch.randn(2, 1, SIDE, SIDE, SIDE, generator=gen)
    label = torch.zeros(2, 1, SIDE, SIDE, SIDE)
    image[..., 8:24, 8:24, 8:24] += 1.0
    label[..., 8:24, 8:24, 8:24] = 1
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss = supervised_loss(loss_fn, model(image), label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_dinounet_deep_supervision_outputs():
    model = tiny_model("DinoUNet", options={"deep_supervision": True}).train()
    image = torch.randn(1, 1, SIDE, SIDE, SIDE)
    outs = model(image)
    assert [tuple(o.shape[2:]) for o in outs] == [(SIDE,) * 3, (SIDE // 2,) * 3, (SIDE // 4,) * 3]
    label = torch.randint(0, 3, (1, 1, SIDE, SIDE, SIDE)).float()
    supervised_loss(DiceCELoss(to_onehot_y=True, softmax=True), outs, label).backward()
    assert all(out.conv.conv.weight.grad is not None for out in model.head.decoder.outs)
    assert model.eval()(image).shape == (1, 3, SIDE, SIDE, SIDE)  # inference: full resolution only


@pytest.mark.parametrize("embed_dim, expected", [(384, [32, 64, 128, 256]), (768, [48, 96, 192, 384]),
                                                 (1024, [64, 128, 256, 512])])
def test_dinounet_size_follows_the_backbone(embed_dim, expected):
    assert decoder_widths("auto", embed_dim) == expected
    assert decoder_widths("s", embed_dim) == [32, 64, 128, 256]
    with pytest.raises(ValueError, match="auto, S, B or L"):
        decoder_widths("XL", embed_dim)


@pytest.mark.parametrize("readout", ["ignore", "add", "project"])
def test_dpt_readout_uses_the_cls_token(readout):
    model = tiny_model("DPT", channels=2, options={"readout": readout}).eval()
    image = torch.randn(1, 2, SIDE, SIDE, SIDE)
    pairs = model.features(image, with_cls=True)
    assert len(pairs) == 4 and all(c.shape == (1, 32) for _, c in pairs)
    for (patches, _), plain in zip(pairs, model.features(image)):
        torch.testing.assert_close(patches, plain)
    with torch.no_grad():
        reference = model.head(image, pairs)
        shifted = model.head(image, [(p, c + 1.0) for p, c in pairs])
    assert model.head.needs_cls == (readout != "ignore")
    assert torch.equal(reference, shifted) == (readout == "ignore")


@pytest.mark.parametrize("patch, fusion, finest, strides", [
    (16, "concat", 2, [2, 4, 8, 16]), (8, "sum", 1, [1, 2, 4, 8]), (8, "concat", 4, [4, 4, 4, 8])])
def test_unetfusion_fuses_each_tap_one_level_finer(patch, fusion, finest, strides):
    model = tiny_model("UNetFusion", patch=patch, options={"fusion": fusion, "finest_stride": finest})
    assert model.head.strides == strides
    assert model(torch.randn(1, 1, SIDE, SIDE, SIDE)).shape == (1, 3, SIDE, SIDE, SIDE)


@pytest.mark.parametrize("head, patch, options", [("DPT", 8, {"fusion_width": 32}), ("UNetFusion", 16, {"width": 32})])
def test_cpu_bf16_conv_guard(head, patch, options):
    """Under CPU bf16 autocast the head's gradient matches fp32, although its coarsest 3×3×3 convs
    see 2-voxel-high maps (where PyTorch 2.13's CPU bf16 kernel gets the weight gradient wrong from
    16 channels up)."""
    model = tiny_model(head, patch=patch, options=options).train()
    image = torch.randn(1, 1, SIDE, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    grads = {}
    for bf16 in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(image)
        logits.float().square().mean().backward()
        grads[bf16] = torch.cat([p.grad.flatten() for p in model.head.parameters()])
    assert torch.isfinite(grads[True]).all()
    assert torch.nn.functional.cosine_similarity(grads[True], grads[False], dim=0) > 0.99


@pytest.mark.parametrize("head", DENSE_HEADS)
def test_default_options_build_from_the_config(head):
    model_cfg = OmegaConf.load(packaged_config_path("eval/segmentation_default"))["model"]
    backbone = build_model("vit_tiny_3d", embed_dim=64, depth=4, num_heads=4, patch_size=16, img_size=32)
    assert build_head(head, backbone, 1, 2, head_options(model_cfg, head)) is not None


def test_unknown_head_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        canonical_head_name("SegFormer")
    assert all(name in str(err.value) for name in HEAD_NAMES)
    assert {"DinoUNet", "DPT", "UNetFusion"} <= set(HEAD_NAMES)
    assert canonical_head_name("dinounet") == "DinoUNet"


@pytest.mark.parametrize("head, side, multiple", [("DPT", 16, 32), ("DinoUNet", 8, 16)])
def test_window_sides_that_do_not_fit_say_the_multiple(head, side, multiple):
    model = tiny_model(head)
    with pytest.raises(ValueError, match=f"multiple of {multiple}"):
        model(torch.randn(1, 1, side, side, side))


def test_unetfusion_finest_stride_beyond_the_patch_is_an_error():
    """Coarser than the patch grid would need downsampling to sizes read from the input (fixed in an ONNX trace)."""
    with pytest.raises(ValueError, match="finest_stride .* at most the patch size 8"):
        tiny_model("UNetFusion", patch=8, options={"finest_stride": 16})
