"""Which device a run computes on: ``auto`` / ``cpu`` / ``cuda`` / ``cuda:<index>`` to a ``torch.device``.

One resolver and one ``--device`` flag for every entry point: the config key ``device`` of
pretraining (one GPU per launched process), segmentation finetuning and linear probing, and the
flag of prediction and visualisation (:func:`add_device_argument`).
"""

from __future__ import annotations

import re

import torch

from .errors import UsageError

DEVICE_CHOICES = ("auto", "cpu", "cuda")
_CUDA_INDEX = re.compile(r"^cuda:(\d+)$")
DEVICE_HELP = "where to compute: auto | cpu | cuda | cuda:<index> (auto = CUDA when available, else the CPU)"


def device_name(value: str) -> str:
    """``value`` if it names a device :func:`resolve_device` knows (argparse ``type`` of ``--device``)."""
    import argparse  # noqa: PLC0415

    if value not in DEVICE_CHOICES and not _CUDA_INDEX.match(value):
        raise argparse.ArgumentTypeError(f"'{value}' is not a device: choose auto, cpu, cuda or cuda:<index>")
    return value


def add_device_argument(parser, default: str | None = None, key: str | None = "device") -> None:
    """The ``--device`` flag, the same in every entry point.

    Args:
        parser: an ``argparse.ArgumentParser``.
        default: the flag's default; None (the config's ``device`` decides) for config-driven commands.
        key: the config key the flag sets, named in the help (None for commands without a config).
    """
    help_text = DEVICE_HELP + (f"; sets the config key {key}" if key else "")
    if default is not None:
        help_text += f" (default: {default})"
    parser.add_argument("--device", type=device_name, default=default, metavar="DEVICE", help=help_text)


def resolve_device(device: str | torch.device, local_rank: int = 0, key: str = "device") -> torch.device:
    """The compute device for ``device``.

    ``auto`` picks CUDA when available, else the CPU. ``cuda`` takes GPU ``local_rank`` (under a
    launcher each process takes its own), or GPU 0 when the process sees a single GPU (SLURM's
    per-task binding: ``--gpus-per-task=1`` or ``CUDA_VISIBLE_DEVICES`` set per task).
    ``cuda:<index>`` names one GPU.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:<index>``.
        local_rank: the process's rank on its node (0 for one plain process).
        key: the config key or flag the user sets the device with, named in errors.

    Raises:
        UsageError: (a ``ValueError``) unknown name, or CUDA requested without a usable GPU / with fewer GPUs than
            processes on the node (or than the index named).
    """
    name = str(device)
    indexed = _CUDA_INDEX.match(name)
    if name not in DEVICE_CHOICES and not indexed:
        raise UsageError(f"Unknown device '{name}'; choose one of {', '.join(DEVICE_CHOICES)} or cuda:<index> "
                         f"(config key {key}).")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"{key}={name} but torch sees no CUDA device; use {key}=cpu or auto.")
    count = torch.cuda.device_count()
    if indexed:
        if int(indexed.group(1)) >= count:
            raise UsageError(f"{key}={name} but only {count} CUDA devices are visible.")
        return torch.device("cuda", int(indexed.group(1)))
    if count == 1:
        return torch.device("cuda", 0)
    if local_rank >= count:
        raise UsageError(
            f"LOCAL_RANK={local_rank} but only {count} CUDA devices are visible; "
            "start at most that many processes per node (torchrun --nproc_per_node)."
        )
    return torch.device("cuda", local_rank)
