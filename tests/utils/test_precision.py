"""The precision policy (dinov2/utils/precision.py): autocast switch, native bf16, recommendation."""

from __future__ import annotations

import pytest
import torch

from dinov2.models import vit_tiny_3d
from dinov2.utils.precision import autocast_context, native_bf16_support, recommended_precision


def test_autocast_context_switches_matmul_dtype():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with autocast_context("fp32"):
        assert lin(x).dtype == torch.float32
    with autocast_context("bf16"):
        assert lin(x).dtype == torch.bfloat16
    assert lin.weight.dtype == torch.float32  # master weights untouched


@pytest.mark.parametrize("precision", ["fp64", "fp16"])
def test_autocast_context_rejects_unsupported(precision):
    with pytest.raises(ValueError):
        autocast_context(precision, "cpu")


def test_bf16_autocast_close_to_fp32_on_tiny_vit():
    torch.manual_seed(0)
    # LayerScale 1.0 so every block contributes (at the 1e-5 default the blocks are ~identity
    # and the comparison would only test the patch embedding).
    model = vit_tiny_3d(img_size=32, patch_size=8, init_values=1.0).train()
    x = torch.randn(2, 1, 32, 32, 32)

    def run(precision):
        model.zero_grad(set_to_none=True)
        with autocast_context(precision, "cpu"):
            out = model.forward_features(x)["x_norm_patchtokens"]
        out.float().square().mean().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return out.detach().float(), grads

    ref_out, ref_grad = run("fp32")
    out, grad = run("bf16")
    out_err = ((out - ref_out).norm() / ref_out.norm()).item()
    grad_err = ((grad - ref_grad).norm() / ref_grad.norm()).item()
    assert 0 < out_err < 2e-2  # > 0: bf16 really ran; bf16 has an 8-bit mantissa (rel. step 4e-3)
    assert grad_err < 5e-2
    assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0) > 0.999


def test_recommended_precision_follows_native_support():
    native = native_bf16_support("cpu")
    assert isinstance(native, bool)
    assert recommended_precision("cpu") == ("bf16" if native else "fp32")


def test_emulated_cuda_bf16_does_not_count_as_native(monkeypatch):
    # V100/T4: torch reports bf16 "supported" through emulation; autocast should pick fp16 there.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert native_bf16_support("cuda") is False
    from dinov2.eval.segmentation.train_loop import resolve_precision
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
