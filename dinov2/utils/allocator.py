"""Keep freed memory inside the process so large CPU tensors do not pay page faults every time.

glibc's ``malloc`` serves every request above its mmap threshold (at most 32 MiB by default)
with a fresh ``mmap`` and gives it back with ``munmap`` on ``free``. A 96³ window with 16-32
channels is 56-113 MB, so every intermediate of a UNETR decoder, every training activation of a
ViT-B at 96³, is a new mapping: the kernel zero-fills it page by page on first touch. On the
2-core reference machine that costs ~30 ms per 56 MB tensor, about as much as the convolution
that fills it (see ``docs/benchmarks.md``, *Segmentation*). PyTorch's CPU tuning guide fixes this
by preloading jemalloc or TCMalloc; raising glibc's mmap and trim thresholds with ``mallopt``
does the same without another library: freed blocks stay in the heap and the next tensor of the
same size reuses them.

The price is that the process keeps its peak heap (resident memory does not shrink after a
peak). Entry points call :func:`tune_cpu_allocator` once at start; set the environment variable
``DINOV2_MALLOC_TUNING=0`` to leave glibc's defaults alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger("dinov2")

ENV_SWITCH = "DINOV2_MALLOC_TUNING"
# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# mallopt takes a C int: the largest threshold it can express (2 GiB - 1).
_LARGEST_THRESHOLD = 2**31 - 1

_state: dict[str, bool] = {}


def _glibc():
    """glibc loaded through ctypes, or None on other C libraries (musl, macOS, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def tune_cpu_allocator(enable: bool | None = None) -> bool:
    """Raise glibc's mmap and trim thresholds so freed large blocks are reused, not unmapped.

    Idempotent and process-wide (forked DataLoader workers inherit it). Call it before the
    heavy work starts; allocations made earlier are not affected.

    Args:
        enable: force on/off; None reads ``DINOV2_MALLOC_TUNING`` (default on; ``0``, ``false``,
            ``no`` or ``off`` disable).

    Returns:
        True when the thresholds are (now or already) raised; False when disabled or when the C
        library is not glibc (nothing to tune: jemalloc/TCMalloc users are already served).
    """
    if enable is None:
        enable = os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")
    if not enable:
        return False
    if "applied" in _state:
        return _state["applied"]
    libc = _glibc()
    applied = bool(libc) and all(libc.mallopt(param, _LARGEST_THRESHOLD) == 1
                                 for param in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD))
    _state["applied"] = applied
    if applied:
        logger.info("allocator: glibc keeps freed memory for reuse (mmap/trim thresholds raised; "
                    "%s=0 to disable)", ENV_SWITCH)
    else:
        logger.info("allocator: not glibc (or mallopt refused); leaving the C allocator as it is")
    return applied
