"""SSLMetaArch: wiring of student/teacher/heads/losses, EMA, optimizer groups, pretrained start."""

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dinov2.loss import DINOLoss, sinkhorn_knopp
from dinov2.optim.param_groups import apply_optim_scheduler
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.config import merge_configs, packaged_config_path

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"


def tiny_cfg(*overrides):
    default = OmegaConf.load(packaged_config_path("ssl3d_default_config"))
    return merge_configs(default, TINY, ["train.datalist=unused.json", *overrides])


@pytest.fixture(scope="module")
def cfg():
    return tiny_cfg()


pytestmark = pytest.mark.usefixtures("one_thread")


def test_step_produces_finite_losses_and_student_only_gradients(cfg, make_batch):
    torch.manual_seed(0)
    arch = SSLMetaArch(cfg)
    arch.train()
    losses = arch.forward_backward(make_batch(cfg), teacher_temp=0.04, monitors=True)
    for key in ("dino_loss", "ibot_loss", "koleo_loss", "total_loss"):
        assert torch.isfinite(losses[key]), key
    assert losses["dino_loss"] > 0 and losses["ibot_loss"] > 0
    expected = losses["dino_loss"] + losses["ibot_loss"] + cfg.dino.koleo_loss_weight * losses["koleo_loss"]
    assert torch.allclose(losses["total_loss"], expected)
    assert 1.0 <= losses["teacher_cls_effective_rank"] <= 8
    assert 0 <= losses["teacher_entropy"] <= np.log(cfg.dino.head_n_prototypes) + 1e-4
    trainable = [(n, p) for n, p in arch.student.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in trainable), [n for n, p in trainable if p.grad is None]
    assert any(p.grad.abs().sum() > 0 for n, p in trainable if n.startswith("ibot_head"))
    assert all(p.grad is None and not p.requires_grad for p in arch.teacher.parameters())
    assert not arch.teacher.training and arch.student.training


def test_dino_term_pairs_each_student_crop_with_the_other_teacher_crops(make_batch):
    torch.manual_seed(0)
    # No drop path: recomputable by hand; no LayerScale: outputs depend on the crop from the start.
    cfg = tiny_cfg("student.drop_path_rate=0.0", "student.layerscale=null")
    arch = SSLMetaArch(cfg, "cpu")
    batch = make_batch(cfg)
    losses = arch.forward_backward(batch, teacher_temp=0.05)
    with torch.no_grad():
        teacher = arch.teacher.backbone.forward_features(batch["collated_global_crops"])["x_norm_clstoken"]
        targets = list(sinkhorn_knopp(arch.teacher.dino_head(teacher), 0.05).chunk(2))
        out = arch.student(batch["collated_global_crops"], batch["mask_indices_list"],
                           batch["collated_local_crops"], batch["collated_masks"])
    crops = list(out["dino_global"].chunk(2)) + list(out["dino_local"].chunk(cfg.crops.local_crops_number))
    loss = DINOLoss(cfg.dino.head_n_prototypes)
    assert torch.allclose(loss(crops, targets), losses["dino_loss"], atol=1e-6)
    assert not torch.allclose(loss(crops, targets[::-1]), losses["dino_loss"], atol=1e-4)


def test_teacher_ignores_masks_student_uses_them(cfg, make_batch):
    torch.manual_seed(0)
    arch = SSLMetaArch(cfg).eval()
    batch = make_batch(cfg)
    crops, local = batch["collated_global_crops"], batch["collated_local_crops"]
    none = torch.zeros_like(batch["collated_masks"])
    every = torch.ones_like(batch["collated_masks"])
    idx = torch.arange(4)
    with torch.no_grad():
        a = arch.student(crops, idx, local, none)["cls_global"]
        b = arch.student(crops, idx, local, every)["cls_global"]
        t = arch.teacher(crops, idx)["cls_global"]
    assert not torch.allclose(a, b)
    assert torch.allclose(a, t, atol=1e-6)  # identical weights, no mask: same CLS


def test_ema_update(cfg):
    torch.manual_seed(0)
    arch = SSLMetaArch(cfg)
    with torch.no_grad():
        for p in arch.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in arch.teacher.parameters()]
    arch.update_teacher(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, arch.teacher.parameters()))
    arch.update_teacher(0.75)
    for t0, t, s in zip(before, arch.teacher.parameters(), arch.student.parameters()):
        assert torch.allclose(t, 0.75 * t0 + 0.25 * s, atol=1e-6)
    with pytest.raises(ValueError, match="momentum"):
        arch.update_teacher(1.5)


def test_optimizer_step_keeps_frozen_last_layer_and_clips(cfg, make_batch):
    torch.manual_seed(0)
    arch = SSLMetaArch(tiny_cfg("optim.clip_grad=0.01"))
    opt = arch.build_optimizer()
    apply_optim_scheduler(opt, lr=1e-3, wd=0.04, last_layer_lr=0.0)
    last = arch.student.dino_head.last_layer.weight_v.detach().clone()
    block = arch.student.backbone.blocks[0].attn.qkv.weight.detach().clone()
    arch.forward_backward(make_batch(cfg), teacher_temp=0.04)
    grad_norm = arch.optimizer_step(opt)
    assert grad_norm > 0.01  # the norm BEFORE clipping
    assert torch.equal(last, arch.student.dino_head.last_layer.weight_v)
    assert not torch.equal(block, arch.student.backbone.blocks[0].attn.qkv.weight)
    assert all(p.grad is None for p in arch.student.parameters())
    lr_mults = {g["lr_multiplier"] for g in opt.param_groups}
    depth = len(arch.student.backbone.blocks)
    assert min(lr_mults) == pytest.approx(0.9 ** (depth + 1) * 0.2) and max(lr_mults) == 1.0  # patch embed, heads


def test_no_masked_token_gives_zero_ibot_loss(cfg, make_batch):
    torch.manual_seed(0)
    arch = SSLMetaArch(cfg)
    losses = arch.forward_backward(make_batch(cfg, mask_probability=0.0), teacher_temp=0.04)
    assert losses["ibot_loss"] == 0 and losses["dino_loss"] > 0
    assert arch.student.ibot_head.mlp[0].weight.grad is not None


def test_softmax_centering_keeps_its_center_in_the_state(cfg, make_batch):
    torch.manual_seed(0)
    arch = SSLMetaArch(tiny_cfg("centering.kind=softmax"))
    assert torch.count_nonzero(arch.dino_centering.center) == 0
    arch.forward_backward(make_batch(cfg), teacher_temp=0.04)
    assert torch.count_nonzero(arch.dino_centering.center) > 0
    assert "dino_centering.center" in arch.state_dict() and "ibot_centering.center" in arch.state_dict()
    prefixes = {k.split(".")[0] for k in arch.state_dict()}
    assert prefixes == {"student", "teacher", "dino_centering", "ibot_centering"}  # each tensor once


def test_pretrained_teacher_with_another_grid_is_resampled(cfg):
    torch.manual_seed(0)
    small = SSLMetaArch(cfg)
    big = SSLMetaArch(tiny_cfg("crops.global_crops_size=48"))
    big.load_pretrained_teacher(small.teacher.state_dict())
    assert big.student.backbone.pos_embed.shape[1] == 1 + 6 ** 3
    assert torch.equal(big.teacher.backbone.blocks[1].mlp.fc1.weight, small.teacher.backbone.blocks[1].mlp.fc1.weight)
    assert torch.equal(big.student.dino_head.last_layer.weight_v, small.teacher.dino_head.last_layer.weight_v)
    with pytest.raises(ValueError, match="does not fit"):
        SSLMetaArch(tiny_cfg("dino.head_n_prototypes=512")).load_pretrained_teacher(small.teacher.state_dict())


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="compute_precision.dtype"):
        SSLMetaArch(tiny_cfg("compute_precision.dtype=fp8"))
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        SSLMetaArch(tiny_cfg("compute_precision.dtype=fp16"))
    with pytest.raises(ValueError, match="centering"):
        SSLMetaArch(tiny_cfg("centering.kind=mean"))


def test_bf16_autocast_on_cpu_keeps_fp32_parameters_and_gradients(make_batch):
    torch.manual_seed(0)
    cfg = tiny_cfg("compute_precision.dtype=bf16")
    arch = SSLMetaArch(cfg)
    losses = arch.forward_backward(make_batch(cfg), teacher_temp=0.04)
    assert all(torch.isfinite(v) for v in losses.values())
    grad = arch.student.backbone.blocks[0].mlp.fc1.weight.grad
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0


def test_emulated_bf16_is_announced(caplog):
    from dinov2.utils.precision import native_bf16_support

    with caplog.at_level("WARNING"):
        SSLMetaArch(tiny_cfg("compute_precision.dtype=bf16"), "cpu")
    emulated = "runs emulated" in caplog.text
    assert emulated == (not native_bf16_support("cpu"))
    if emulated:
        assert "compute_precision.dtype=fp32" in caplog.text


def _grad_norms_at_step(arch, opt):
    """Run optimizer_step and return each module's gradient norm as the optimizer saw it."""
    seen = {}
    step = opt.step

    def recording_step(*args, **kwargs):
        for name in ("backbone", "dino_head", "ibot_head"):
            grads = [p.grad for p in getattr(arch.student, name).parameters() if p.grad is not None]
            seen[name] = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        return step(*args, **kwargs)

    opt.step = recording_step
    arch.optimizer_step(opt)
    return seen


@pytest.mark.parametrize("per_module", [True, False])
def test_gradient_clipping_per_module_or_global(per_module, make_batch):
    torch.manual_seed(0)
    cfg = tiny_cfg("optim.clip_grad=0.01", f"optim.clip_grad_per_module={str(per_module).lower()}")
    arch = SSLMetaArch(cfg)
    opt = arch.build_optimizer()
    apply_optim_scheduler(opt, lr=1e-3, wd=0.04, last_layer_lr=1e-3)
    arch.forward_backward(make_batch(cfg), teacher_temp=0.04)
    norms = _grad_norms_at_step(arch, opt)
    if per_module:  # each part clipped to the limit on its own
        assert all(n == pytest.approx(0.01, rel=1e-3) for n in norms.values()), norms
    else:  # one global norm: the parts share the limit
        assert sum(n ** 2 for n in norms.values()) ** 0.5 == pytest.approx(0.01, rel=1e-3)
        assert min(norms.values()) < 0.01 * 0.9


@pytest.mark.parametrize("train_norm", [True, False])
def test_prototype_norm_is_trained_only_when_asked(train_norm):
    cfg = tiny_cfg(f"dino.head_train_prototype_norm={str(train_norm).lower()}",
                   f"ibot.head_train_prototype_norm={str(train_norm).lower()}")
    arch = SSLMetaArch(cfg)
    for head in (arch.student.dino_head, arch.student.ibot_head):
        assert head.last_layer.weight_g.requires_grad is train_norm
    names = {n for g in arch.build_optimizer().param_groups for n in g["names"]}
    assert ("dino_head.last_layer.weight_g" in names) is train_norm


def test_effective_rank_of_non_finite_embeddings_is_nan_not_an_svd_error():
    """A step whose teacher output is NaN must reach the run's clear non-finite-loss error."""
    from dinov2.train.metrics import effective_rank

    x = torch.randn(8, 16)
    assert 1.0 <= float(effective_rank(x)) <= 8
    x[3, 2] = float("nan")
    assert torch.isnan(effective_rank(x))
