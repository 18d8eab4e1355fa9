"""ONNX and ONNX Runtime, the optional ``export`` extra: imported on first use, never at import time.

Without them the rest of the toolkit works as before; a command that needs them stops with one
line naming the install command (:data:`~dinov2.export.errors.INSTALL_HINT`).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from .errors import INSTALL_HINT, MissingExportDependency

CPU_PROVIDER = "CPUExecutionProvider"


def _require(module: str, purpose: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExportDependency(f"{purpose} needs the '{module}' package, which is not installed: "
                                      f"run {INSTALL_HINT}") from exc


def import_onnx() -> ModuleType:
    """The ``onnx`` module (writing graphs and their metadata)."""
    return _require("onnx", "ONNX export")


def import_onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module (running exported graphs)."""
    return _require("onnxruntime", "Running an ONNX model")


def cpu_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime session of ``path`` on the CPU execution provider.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (None: ONNX Runtime's default, one per physical core).

    Returns:
        ``onnxruntime.InferenceSession``.
    """
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    # Failures reach the caller as exceptions (and become one ERROR line); ONNX Runtime's own log
    # would print each a second time, in colour, on stderr.
    options.log_severity_level = 4
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        # One thread means one: no inter-op pool either, so a benchmark's CPU time is comparable.
        options.inter_op_num_threads = 1
    return ort.InferenceSession(os.fspath(path), options, providers=[CPU_PROVIDER])
