"""Performance helpers shared by the benchmarks and training: FLOPs, peaks, timing, precision.

* **FLOPs** are counted analytically as ``2 · MACs`` of every matrix product and convolution
  of the forward pass (element-wise ops, norms and softmax are not counted, the usual MFU
  convention); a training step (forward + backward) counts ``3 ×`` the forward.
  :func:`counted_forward_flops` cross-checks the formula with PyTorch's own FLOP counter.
* **Peak**: :func:`matmul_peak_gflops` measures large square GEMMs in the running process
  with the current thread count, so MFU is relative to what this machine really delivers.
* **Timing**: :func:`time_callable` returns every sample after a warm-up; report the median.
* **Precision**: :func:`autocast_context` is the one switch between fp32 and reduced-precision
  autocast; :func:`native_bf16_support` says whether bf16 matrix products have hardware
  support here (CPU AVX512-BF16/AMX, or a bf16-capable GPU). Without it bf16 is *slower* than
  fp32 on CPU (see ``docs/benchmarks.md``), so :func:`recommended_precision` returns fp32.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class TimingResult:
    """Wall-clock and CPU seconds of repeated calls (warm-up excluded).

    Attributes:
        times: wall seconds of each timed call, in call order.
        cpu_times: process CPU seconds (all threads) of the same calls. ``cpu / wall`` is the
            number of cores the call really got: well below the thread count means other
            processes were competing and the wall times are pessimistic.
    """

    times: tuple[float, ...]
    cpu_times: tuple[float, ...] = ()

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.times)

    @property
    def cores_used(self) -> float:
        """Median over calls of CPU seconds per wall second (nan without ``cpu_times``)."""
        if not self.cpu_times:
            return float("nan")
        return statistics.median(c / w for c, w in zip(self.cpu_times, self.times))

    @property
    def spread(self) -> float:
        """``(max - min) / median``: a large value means the machine was busy or throttling."""
        return (max(self.times) - min(self.times)) / self.median


def time_callable(fn: Callable[[], object], repeats: int = 5, warmup: int = 1,
                  synchronize: Callable[[], None] | None = None) -> TimingResult:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed.

    Args:
        fn: the work to time (its return value is ignored).
        repeats: timed calls (>= 1).
        warmup: untimed calls first (>= 0): first calls pay for allocation, oneDNN primitive
            creation and, under ``torch.compile``, compilation.
        synchronize: called after each call before the clock stops (e.g.
            ``torch.cuda.synchronize`` for asynchronous devices); None on CPU.

    Returns:
        :class:`TimingResult` with ``repeats`` wall and CPU samples.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
        if synchronize is not None:
            synchronize()
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        if synchronize is not None:
            synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return TimingResult(tuple(times), tuple(cpu_times))


# ------------------------------------------------------------------------------ FLOPs
def vit_forward_flops(batch: int, num_patches: int, patch_voxels: int, in_chans: int, embed_dim: int,
                      depth: int, block_linear_macs_per_token: int, num_prefix_tokens: int = 1) -> int:
    """Forward FLOPs (``2 · MACs``) of a ViT on ``batch`` samples.

    ``MACs/sample = N·C·P·E  +  depth · (T·M_lin + 2·T²·E)`` with ``N`` patches of ``P``
    voxels and ``C`` channels, ``T = N + prefix`` tokens, ``E`` width and ``M_lin`` the MACs of
    a block's token-wise linears per token (``12·E²`` for a ratio-4 GELU MLP: qkv ``3E²``, proj
    ``E²``, fc1 + fc2 ``8E²``). ``2·T²·E`` is ``q kᵀ`` plus ``attn · v`` over all heads.

    Args:
        batch: samples.
        num_patches: ``N`` patch tokens per sample.
        patch_voxels: ``P`` voxels per patch (``p³``).
        in_chans: ``C``.
        embed_dim: ``E``.
        depth: number of blocks.
        block_linear_macs_per_token: ``M_lin``.
        num_prefix_tokens: CLS + register tokens.

    Returns:
        FLOPs of one forward pass (int).
    """
    tokens = num_patches + num_prefix_tokens
    macs = num_patches * in_chans * patch_voxels * embed_dim
    macs += depth * (tokens * block_linear_macs_per_token + 2 * tokens * tokens * embed_dim)
    return 2 * batch * macs


def model_forward_flops(model: nn.Module, input_shape: Iterable[int]) -> int:
    """Analytic forward FLOPs of a ``VisionTransformer3D`` for an input ``(B, C, H, W, D)``.

    Reads the shape from the model (``patch_embed``, ``embed_dim``, ``blocks``,
    ``num_register_tokens``) so any registered architecture, GELU or SwiGLU, is counted
    the same way: every ``nn.Linear`` inside a block contributes ``in·out`` MACs per token.

    Args:
        model: a ``VisionTransformer3D`` (duck-typed; ``utils`` does not import ``models``).
        input_shape: ``(B, C, H, W, D)``.

    Returns:
        forward FLOPs (int); multiply by :data:`TRAIN_STEP_FLOP_FACTOR` for a training step.
    """
    batch, chans, *spatial = (int(s) for s in input_shape)
    if len(spatial) != 3:
        raise ValueError(f"input_shape must be (B, C, H, W, D), got {tuple(input_shape)}")
    grid = model.patch_embed.grid_size(tuple(spatial))
    patch_size = model.patch_embed.patch_size
    linear_macs = {sum(m.in_features * m.out_features for m in blk.modules() if isinstance(m, nn.Linear))
                   for blk in model.blocks}
    if len(linear_macs) != 1:
        raise ValueError(f"blocks have different linear shapes {sorted(linear_macs)}; count them separately")
    return vit_forward_flops(
        batch=batch, num_patches=grid[0] * grid[1] * grid[2],
        patch_voxels=patch_size[0] * patch_size[1] * patch_size[2], in_chans=chans,
        embed_dim=model.embed_dim, depth=len(model.blocks), block_linear_macs_per_token=linear_macs.pop(),
        num_prefix_tokens=1 + model.num_register_tokens,
    )


# Backward costs two matrix products per forward product (grad wrt input and wrt weight).
TRAIN_STEP_FLOP_FACTOR = 3


def counted_forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Forward FLOPs of ``model(x)`` measured by ``torch.utils.flop_counter.FlopCounterMode``.

    The counter has no formula for PyTorch's fused CPU attention kernel, so attention runs on
    the SDPA *math* backend here: it is built from ``bmm`` calls that the counter sees. This
    makes the count independent of :func:`model_forward_flops` (nothing is re-registered).

    Args:
        model: any module; called as ``model(x)`` under ``torch.no_grad``.
        x: its input.

    Returns:
        FLOPs counted (matrix products and convolutions).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x)
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------- peak
def matmul_peak_gflops(dtype: torch.dtype = torch.float32, size: int = 3072, repeats: int = 5,
                       device: str | torch.device = "cpu") -> float:
    """Measured GEMM throughput (GFLOP/s) of two ``size × size`` matrices of ``dtype``.

    The product is ``a @ b.T`` (``F.linear``'s layout, the one every ViT matmul uses); on CPUs
    without native bf16 the software bf16 kernels are up to 10× slower in the ``a @ b`` layout,
    so the layout matters. Uses the current ``torch.get_num_threads()``; the median of
    ``repeats`` products after one warm-up. This is the practical peak that MFU is quoted
    against.

    Args:
        dtype: element type (``torch.float32``, ``torch.bfloat16``, ...).
        size: matrix side; 2048-4096 reaches the BLAS plateau on CPU.
        repeats: timed products.
        device: where to run.

    Returns:
        ``2·size³ / median_seconds / 1e9``.
    """
    if size < 64:
        raise ValueError(f"size must be >= 64 to measure a meaningful peak, got {size}")
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    timing = time_callable(lambda: torch.nn.functional.linear(a, b), repeats=repeats, warmup=1, synchronize=sync)
    return 2 * size ** 3 / timing.median / 1e9


# -------------------------------------------------------------------------- precision
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


# --------------------------------------------------------------------------- machine
def machine_description() -> dict[str, str]:
    """What the numbers were measured on: CPU model, cores, threads, ISA, BLAS, torch version."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu,
        "logical_cpus": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": str(native_bf16_support("cpu")),
        "torch": torch.__version__,
        "load_average_1m": f"{load[0]:.2f}",
    }
