"""A segmenter exported by :mod:`dinov2.export`, run by ONNX Runtime on the CPU, in place of the torch model.

:func:`load_onnx_model` returns what :func:`dinov2.checkpoints.finetuned.load_finetuned` returns
(model, preset, info), read from the ``.onnx`` file alone (its metadata: :mod:`dinov2.export.metadata`),
so ``predict --model model.onnx`` runs the same pipeline as ``predict --checkpoint best_model.pth``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from dinov2.eval.presets import DatasetPreset
from dinov2.export.errors import OnnxModelError
from dinov2.export.metadata import parse_metadata, preset_from_metadata
from dinov2.export.runtime import cpu_session, import_onnxruntime

logger = logging.getLogger(__name__)

EXPECTED = "the .onnx file written by python -m dinov2.export --format onnx"


class OnnxSegmenter:
    """Callable like the finetuned torch model: ``(b, C, H, W, D)`` → logits ``(b, K, H, W, D)``.

    Enough of ``nn.Module`` for :func:`~dinov2.eval.segmentation.inference.predict_probabilities`
    and MONAI's ``sliding_window_inference``: ``training`` (always False), ``eval()``,
    ``train(False)``. Windows may come on any device; ONNX Runtime computes in float32 on the CPU
    and the logits go back to the window's device.

    Args:
        session: an ``onnxruntime.InferenceSession`` of the file.
        metadata: its parsed metadata (``kind`` ``segmentation``).
        path: the file, for messages.
    """

    training = False
    device = torch.device("cpu")

    def __init__(self, session, metadata: Mapping[str, Any], path: Path):
        self.session, self.metadata, self.path = session, dict(metadata), path
        self.input = dict(metadata["input"])
        self.head_name = metadata["head"]

    def eval(self) -> "OnnxSegmenter":
        """No-op (an exported graph is in inference mode); returns self."""
        return self

    def train(self, mode: bool = True) -> "OnnxSegmenter":
        """``train(False)`` is a no-op; an exported graph cannot be trained."""
        if mode:
            raise ValueError(f"{self.path} is an exported (inference-only) model; it cannot be put in training mode.")
        return self

    def check_input(self, shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` naming the file when the graph cannot take an input of ``shape``."""
        channels, size = self.input["channels"], list(shape[2:])
        if len(shape) != 5 or shape[1] != channels:
            raise ValueError(f"{self.path} takes (B, {channels}, H, W, D) windows, got {list(shape)}")
        if not self.input["dynamic_spatial"] and size != self.input["example_size"]:
            raise ValueError(f"{self.path} ({self.head_name}) takes windows of {self.input['example_size']} only, "
                             f"got {size}")
        multiple = self.input["spatial_multiple"]
        if any(s % multiple for s in size):
            raise ValueError(f"{self.path} takes window sides that are multiples of {multiple}, got {size}")

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(b, K, H, W, D)`` float32 of windows ``(b, C, H, W, D)``, on the windows' device."""
        self.check_input(tuple(image.shape))
        array = np.ascontiguousarray(torch.as_tensor(image).detach().to("cpu", torch.float32).numpy())
        (logits,) = self.session.run(["logits"], {self.input["name"]: array})
        return torch.from_numpy(logits).to(image.device)


def _session(path: Path, threads: int | None):
    """The ONNX Runtime session of ``path``, with one-line errors for a missing or unreadable file."""
    if not path.exists():
        raise FileNotFoundError(f"ONNX model not found: {path}. Pass {EXPECTED} (--model).")
    if not path.is_file():
        raise OnnxModelError(f"--model {path} is not a file. Pass {EXPECTED}.")
    import_onnxruntime()  # the install hint, before any other error
    try:
        return cpu_session(path, threads)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises one class per status code
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise OnnxModelError(f"{path} is not an ONNX model ONNX Runtime can load ({first}). Pass {EXPECTED}.") from exc


def load_onnx_model(path: str | os.PathLike, requested_device: torch.device | str | None = None,
                    precision: str = "fp32", threads: int | None = None
                    ) -> tuple[OnnxSegmenter, DatasetPreset, dict]:
    """Load an exported segmenter with the preset and settings stored in it.

    Args:
        path: the ``.onnx`` file written by ``python -m dinov2.export``.
        requested_device, precision: what the caller asked for; a note is logged when they cannot
            apply (ONNX Runtime runs float32 on the CPU).
        threads: ONNX Runtime intra-op threads (None: its default).

    Returns:
        ``(model, preset, info)`` like :func:`~dinov2.checkpoints.finetuned.load_finetuned`:
        ``info`` holds ``head``, ``iteration``, ``config`` (``{"evaluation": {...}}``), ``metric``
        and ``metadata``.

    Raises:
        FileNotFoundError: no such file. OnnxModelError: not an ONNX file, not one of ours, or a
        backbone export. MissingExportDependency: onnxruntime is not installed.
    """
    path = Path(path)
    session = _session(path, threads)
    metadata = parse_metadata(session.get_modelmeta().custom_metadata_map, path)
    if metadata["kind"] != "segmentation":
        raise OnnxModelError(f"{path} is an exported backbone (CLS and patch tokens), not a segmenter; export "
                             "the finetuned best_model.pth to segment with it.")
    if requested_device is not None and torch.device(requested_device).type != "cpu":
        logger.info("%s runs with ONNX Runtime on the CPU; --device applies to --checkpoint only", path.name)
    if precision != "fp32":
        logger.warning("--precision %s applies to --checkpoint only; the ONNX model computes in float32", precision)
    source = metadata.get("source") or {}
    info = {"head": metadata["head"], "iteration": int(source.get("iteration") or 0), "metric": source.get("metric"),
            "config": {"evaluation": dict(metadata["evaluation"])}, "metadata": metadata}
    return OnnxSegmenter(session, metadata, path), preset_from_metadata(metadata), info
