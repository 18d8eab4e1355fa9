"""bf16 autocast on the GPU gives the DINO, iBOT and KoLeo losses and gradients of fp32, within bf16's tolerance.

The same weights and batch through ``SSLMetaArch.forward_backward`` with
``compute_precision.dtype`` fp32 and bf16. Without LayerScale (the tiny config's 1e-5 would
make every block nearly the identity) and without stochastic depth, so the whole network and
nothing random enters the comparison.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda

LOSSES = ("dino_loss", "ibot_loss", "koleo_loss")


def _step(cfg, batch) -> tuple[dict[str, float], torch.Tensor]:
    """Losses and the student's flattened gradient after one forward + backward from seed 0."""
    from dinov2.train.ssl_meta_arch import SSLMetaArch

    torch.manual_seed(0)
    arch = SSLMetaArch(cfg, cfg.device).train()
    losses = arch.forward_backward(batch, teacher_temp=0.04)
    grad = torch.cat([p.grad.flatten().double() for p in arch.student.parameters() if p.grad is not None])
    return {k: float(losses[k]) for k in LOSSES}, grad


def test_bf16_autocast_losses_and_gradients_match_fp32(tiny_cfg, make_batch):
    common = ("student.layerscale=null", "student.drop_path_rate=0.0", "ibot.mask_sample_probability=1.0")
    fp32_cfg = tiny_cfg(*common, "compute_precision.dtype=fp32")
    bf16_cfg = tiny_cfg(*common, "compute_precision.dtype=bf16")
    batch = make_batch(fp32_cfg, batch_size=8)
    fp32, fp32_grad = _step(fp32_cfg, batch)
    bf16, bf16_grad = _step(bf16_cfg, batch)
    assert fp32 != bf16  # autocast really ran in bf16
    for key in LOSSES:
        assert bf16[key] == pytest.approx(fp32[key], rel=2e-2), key
    cosine = float(bf16_grad @ fp32_grad / (bf16_grad.norm() * fp32_grad.norm()))
    assert cosine > 0.99
