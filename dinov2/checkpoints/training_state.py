"""Full training state on disk: written atomically, the last K kept, resumable by any number of processes.

One file per checkpoint, ``<output>/checkpoints/model_<iteration:07d>.pth``, where
``iteration`` counts the iterations completed. It holds::

    {"format": "dinov2_3d_training_state", "version": 1,
     "iteration": int,                    # completed iterations; the next one to run
     "model": {student.*, teacher.*, dino_centering.*, ibot_centering.*},
     "optimizer": AdamW state dict, "scaler": GradScaler state dict or None,
     "sampler": {"global_position", "seed", "size", "shuffle"},
     "rng": [per-rank {"python", "numpy", "torch", "cuda"}],   # index = rank (dinov2.utils.rng)
     "world_size": int, "config": <resolved config, plain dicts>}

Everything is unsharded and replicated state (DDP keeps identical replicas; FSDP state is
gathered to full tensors first), so a job with a different number of processes can load it.
Rank 0 writes through :func:`dinov2.utils.io.atomic_torch_save` (temporary file, fsync,
rename): a run killed while writing leaves the previous checkpoints intact plus a stray
temporary file, which :meth:`TrainingCheckpointer.latest` ignores and removes.

Only plain containers, tensors and numbers are stored, so files load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from dinov2 import distributed
from dinov2.utils.io import atomic_torch_save

logger = logging.getLogger(__name__)

FORMAT = "dinov2_3d_training_state"
VERSION = 1
_NAME = re.compile(r"^model_(\d{7,})\.pth$")


def checkpoint_name(iteration: int) -> str:
    """File name of the checkpoint after ``iteration`` completed iterations."""
    return f"model_{int(iteration):07d}.pth"


class TrainingCheckpointer:
    """Save, find, load and prune full training-state checkpoints of one run.

    Args:
        output_dir: the run's folder; checkpoints go to ``output_dir/checkpoints``.
        max_to_keep: newest checkpoints kept after each save (>= 1).
    """

    def __init__(self, output_dir: str | os.PathLike, max_to_keep: int = 3) -> None:
        if int(max_to_keep) < 1:
            raise ValueError(f"checkpointing.max_to_keep must be >= 1, got {max_to_keep}.")
        self.directory = Path(output_dir) / "checkpoints"
        self.max_to_keep = int(max_to_keep)

    def list(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as ``(iteration, path)``, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match and path.is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None; removes temporary files of interrupted saves (rank 0)."""
        if distributed.is_main_process() and self.directory.is_dir():
            for stray in self.directory.glob(".model_*.tmp"):
                logger.warning("Removing %s, left by a save that was interrupted", stray)
                stray.unlink(missing_ok=True)
        found = self.list()
        return found[-1][1] if found else None

    def save(self, state: Mapping[str, Any]) -> Path | None:
        """Write ``state`` (see the module docstring) as the checkpoint of ``state["iteration"]``.

        Called on every rank (the caller gathers state collectively first); only rank 0
        writes. Older checkpoints beyond ``max_to_keep`` are deleted after the new one is safe.

        Returns:
            The written path on rank 0, None elsewhere.
        """
        if not distributed.is_main_process():
            return None
        payload = {"format": FORMAT, "version": VERSION, **state}
        path = atomic_torch_save(payload, self.directory / checkpoint_name(state["iteration"]))
        for _, old in self.list()[: -self.max_to_keep]:
            old.unlink(missing_ok=True)
        logger.info("Saved training state after %d iterations to %s", state["iteration"], path)
        return path

    @staticmethod
    def load(path: str | os.PathLike) -> dict[str, Any]:
        """Read a checkpoint onto the CPU and check it is a training state of this format.

        Raises:
            ValueError: the file is not a training-state checkpoint (e.g. a teacher export).
        """
        path = Path(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a training-state checkpoint (no format '{FORMAT}'). To start from a "
                "teacher export, set student.pretrained_weights instead."
            )
        if int(state.get("version", 0)) > VERSION:
            raise ValueError(f"{path} has version {state['version']}; this toolkit reads up to {VERSION}.")
        return state
