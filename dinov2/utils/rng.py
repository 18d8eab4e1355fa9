"""Random-generator state of this process: captured as storable values, restored exactly.

One capture/restore pair for every resumable run: the pretraining checkpoints
(:mod:`dinov2.checkpoints.training_state`, one state per rank) and the resumable state of
segmentation finetuning (``last_checkpoint.pth``). The captured state holds only lists,
numbers, strings and tensors, so files that hold it load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any, Mapping

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch (and CUDA) generator states, as storable values.

    Returns:
        ``{"python": [version, state list, gauss], "numpy": [name, keys (int64 tensor), pos,
        has_gauss, cached], "torch": ByteTensor, "cuda": [ByteTensor per visible GPU]}``.
    """
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`.

    Also reads the states written before this module existed by segmentation finetuning
    (``random.getstate()`` and ``np.random.get_state()`` tuples as they are, no CUDA entry). CUDA
    states are restored for the GPUs visible now (at most as many as were saved).
    """
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"])[: torch.cuda.device_count()])
