"""What the benchmarks measure with: FLOP counts, the machine's matmul peak, timing, the machine.

Only ``scripts/benchmark*.py`` and their tests import this package; training and evaluation
never do (their precision switch lives in :mod:`dinov2.utils.precision`).

* **FLOPs** are counted analytically as ``2 · MACs`` of every matrix product and convolution
  of the forward pass (element-wise ops, norms and softmax are not counted, the usual MFU
  convention); a training step (forward + backward) counts ``3 ×`` the forward.
  :func:`counted_forward_flops` cross-checks the formula with PyTorch's own FLOP counter.
* **Peak**: :func:`matmul_peak_gflops` measures large square GEMMs in the running process
  with the current thread count, so MFU is relative to what this machine really delivers.
* **Timing**: :func:`time_callable` returns every sample after a warm-up; report the median.
* **Machine**: :func:`machine_description` records what the numbers were measured on.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from dinov2.utils.precision import native_bf16_support


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
        model: a ``VisionTransformer3D`` (duck-typed: any module with that shape).
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
