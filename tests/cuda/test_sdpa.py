"""The fused SDPA kernels (flash, memory-efficient) compute what the math kernel computes.

Through the model's own ``Attention`` at the shapes of the ViT-L/16 recipe (1024 wide, 16 heads
of 64; a 96³ global crop is 6³ + 1 tokens, a 48³ local crop 3³ + 1), forward and backward.
Under bf16 autocast (how training runs) a fused kernel must be as close to the fp32 math
result as the bf16 math kernel is; in fp32 the memory-efficient kernel must match math to
fp32 rounding. ``sdpa_kernel`` with one backend raises if that kernel cannot run, so a pass
also proves the kernel ran.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dinov2.layers.attention import Attention, reset_xformers_probe

pytestmark = pytest.mark.cuda

FUSED = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}


@pytest.fixture(autouse=True)
def sdpa_only(monkeypatch):
    """xformers, when installed, would bypass SDPA: these tests are about SDPA's kernels."""
    monkeypatch.setenv("DINOV2_XFORMERS", "0")
    reset_xformers_probe()
    yield
    reset_xformers_probe()


def _attention_pass(attn: Attention, x: torch.Tensor, backend: SDPBackend, bf16: bool) -> dict[str, torch.Tensor]:
    """Output and input/parameter gradients of ``attn(x)`` on one SDPA backend (fp32 copies)."""
    attn.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    weights = torch.linspace(-1, 1, x.numel(), device=x.device).view_as(x)  # a loss that weighs every output
    with sdpa_kernel(backend), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = attn(x)
    (out.float() * weights).sum().backward()
    grads = {f"grad {name}": p.grad.float() for name, p in attn.named_parameters()}
    return {"out": out.detach().float(), "grad input": x.grad.float(), **grads}


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm())


@pytest.fixture(scope="module")
def vit_l_attention():
    torch.manual_seed(0)
    return Attention(1024, num_heads=16).cuda()


@pytest.mark.parametrize("tokens", [217, 28])
@pytest.mark.parametrize("kernel", sorted(FUSED))
def test_fused_kernel_under_bf16_autocast_is_as_close_to_fp32_as_math(vit_l_attention, kernel, tokens):
    x = torch.randn(4, tokens, 1024, device="cuda", generator=torch.Generator("cuda").manual_seed(tokens))
    reference = _attention_pass(vit_l_attention, x, SDPBackend.MATH, bf16=False)
    math = _attention_pass(vit_l_attention, x, SDPBackend.MATH, bf16=True)
    fused = _attention_pass(vit_l_attention, x, FUSED[kernel], bf16=True)
    assert reference.keys() == fused.keys()
    for name in reference:
        math_err, fused_err = _rel_err(math[name], reference[name]), _rel_err(fused[name], reference[name])
        assert math_err > 0, name  # autocast really ran in bf16
        assert fused_err <= 2 * math_err + 1e-3, (name, fused_err, math_err)


def test_memory_efficient_kernel_matches_math_in_fp32(vit_l_attention):
    x = torch.randn(4, 217, 1024, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    reference = _attention_pass(vit_l_attention, x, SDPBackend.MATH, bf16=False)
    fused = _attention_pass(vit_l_attention, x, SDPBackend.EFFICIENT_ATTENTION, bf16=False)
    for name in reference:
        assert _rel_err(fused[name], reference[name]) < 1e-4, name
