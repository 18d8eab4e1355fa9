"""The precision policy: fp32 or reduced-precision autocast, and when bf16 pays off.

:func:`autocast_context` is the one switch between fp32 and reduced-precision autocast for
training, finetuning and inference; :func:`native_bf16_support` says whether bf16 matrix
products have hardware support here (CPU AVX512-BF16/AMX, or a bf16-capable GPU). Without it
bf16 is *slower* than fp32 on CPU (see ``docs/benchmarks.md``), so
:func:`recommended_precision` returns fp32 there.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16_support(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matrix products have hardware support on ``device``.

    CPU: AVX512-BF16 or AMX (oneDNN then runs bf16 GEMMs at 2-16× the fp32 rate); without
    them PyTorch converts in software and bf16 is several times *slower* than fp32.
    CUDA: ``torch.cuda.is_bf16_supported(including_emulation=False)``: compute capability 8.0+
    (Ampere on); V100 and T4 only emulate bf16, slowly, and should use fp16.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        raise ValueError(f"native_bf16_support knows cpu and cuda, got '{device.type}'")
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def recommended_precision(device: str | torch.device = "cpu") -> str:
    """``"bf16"`` where bf16 GEMMs are native (:func:`native_bf16_support`), else ``"fp32"``.

    fp16 is never recommended: bf16 needs no loss scaling and every GPU with fast fp16 since
    Ampere has bf16 too.
    """
    return "bf16" if native_bf16_support(device) else "fp32"


def autocast_context(precision: str, device: str | torch.device = "cpu") -> contextlib.AbstractContextManager:
    """The context to run a forward pass in for ``precision``.

    ``"fp32"`` is a no-op; ``"bf16"`` / ``"fp16"`` are ``torch.autocast`` with the weight-cast
    cache enabled (within one context each weight is cast once even if used by several crop
    groups). Parameters and gradients stay fp32, so the optimizer keeps fp32 master weights by
    construction. Run the backward pass outside the context, as ``torch.autocast`` requires.

    Args:
        precision: one of :data:`PRECISIONS`.
        device: device the model runs on.

    Returns:
        a context manager.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got '{precision}'")
    device_type = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device_type == "cpu":
        raise ValueError("fp16 autocast is not supported for CPU training here: use precision='bf16' or 'fp32'")
    return torch.autocast(device_type=device_type, dtype=_AUTOCAST_DTYPES[precision], cache_enabled=True)
