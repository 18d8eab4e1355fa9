"""Checkpoint layouts: open a file, recognise its layout and split it into backbone, heads and the rest.

Layouts recognised by :func:`read_checkpoint` (detected, never guessed silently):

* **Our teacher checkpoint** (``format_version`` 1, written by
  :func:`dinov2.checkpoints.teacher_export.save_teacher_checkpoint`): ``{"teacher": {backbone.*,
  dino_head.*, ibot_head.*}, "config": dict, "iteration": int, "format_version": 1}``. The
  embedded config describes the backbone (keys read by :mod:`dinov2.models.build`).
* **The published 3DINO-ViT teacher checkpoint** (``{"teacher": {...}}``, no config): blocks
  stored in chunks as ``backbone.blocks.<chunk>.<global index>.<param>``.
* **Plain backbone state dicts** (``cls_token``, ``blocks.<i>.*``, ...) and dicts wrapped under
  ``teacher`` / ``model`` / ``state_dict`` / ``student`` (first found in that order, so the
  teacher wins), possibly with ``module.`` (DDP), ``_orig_mod.`` (torch.compile),
  ``backbone.`` or ``teacher.`` prefixes (:func:`normalize_state_dict_keys`).

Files that are no backbone checkpoint at all are named for what they are: NIfTI, DICOM, gzip,
text, a truncated archive, or a finetuned segmentation model (``best_model.pth`` /
``last_checkpoint.pth`` of segmentation finetuning, :mod:`dinov2.checkpoints.finetuned`), whose
error names the teacher it was finetuned from.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dinov2.models.build import is_random_init

from .errors import CheckpointError, FinetunedModelError

TEACHER_FORMAT_VERSION = 1
# Marker of best_model.pth (the "format" key written by dinov2.checkpoints.finetuned).
# last_checkpoint.pth instead carries the resume-only key "frozen_from".
FINETUNED_SEGMENTATION_FORMAT = "dinov2_3d_segmentation"
# Searched in this order: the EMA teacher is the model meant for downstream use.
WRAPPER_KEYS = ("teacher", "model", "state_dict", "student")
# Path segments that wrappers insert into parameter names (DDP, torch.compile).
TRANSPARENT_SEGMENTS = ("module", "_orig_mod")
_CHUNKED_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")
FLAT_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# Legacy (non-zip) torch.save files start with pickle protocol 2 and torch's magic number.
_LEGACY_TORCH_HEADER = b"\x80\x02\x8a\x0a" + bytes.fromhex("6cfc9c46f9206aa85019")
HINT = "Check the path given with --pretrained-weights (or the `pretrained_weights` config key)."


@dataclass
class CheckpointContents:
    """What :func:`read_checkpoint` found in a file, keys already normalised.

    Attributes:
        path: the file.
        source_format: ``"dinov2_3d_teacher_v1"`` (ours), ``"3dino_published"`` (teacher
            dict, no config), ``"wrapped:<key>"`` or ``"plain_state_dict"``.
        backbone: backbone tensors with flat names (``blocks.<i>.<param>``, no prefixes).
        heads: head state dicts by head name (``dino_head``, ``ibot_head``), prefix stripped.
        other_keys: remaining tensor names of the selected state dict (neither backbone nor head).
        top_level_keys: keys of the file's top-level dict.
        wrapper_key: the top-level key the state dict came from, if any.
        stripped_prefixes: prefixes removed from parameter names (``module.``, ``backbone.``…).
        chunked_blocks: whether blocks were stored as ``blocks.<chunk>.<index>``.
        config: the embedded config (plain dict) or None.
        iteration: the embedded iteration or None.
    """

    path: Path
    source_format: str
    backbone: dict[str, torch.Tensor]
    heads: dict[str, dict[str, torch.Tensor]]
    other_keys: list[str]
    top_level_keys: list[str]
    wrapper_key: str | None = None
    stripped_prefixes: list[str] = field(default_factory=list)
    chunked_blocks: bool = False
    config: dict | None = None
    iteration: int | None = None


def preview_keys(keys: list[str], limit: int = 12) -> str:
    """Readable list of keys; whole blocks collapse to ``blocks.<i>.* (n tensors)``."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        m = FLAT_BLOCK.match(key)
        groups.setdefault(f"blocks.{m.group(1)}.*" if m else key, []).append(key)
    items = [name if len(members) == 1 and name == members[0] else f"{name} ({len(members)} tensors)"
             for name, members in groups.items()]
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# ----------------------------------------------------------------------------- reading the file
def _describe_non_checkpoint(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(352)
    if head[:4] == b"PK\x03\x04":
        return "it starts like a torch.save archive but is truncated or corrupt (interrupted copy?)"
    if head[:2] == b"\x1f\x8b":
        return "it is gzip-compressed (a .nii.gz image?)"
    if head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "it is a NIfTI image"
    if head[:4] == b"DICM" or head[128:132] == b"DICM":
        return "it is a DICOM file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "its content is not a torch.save archive"
    return "it is a text file"


TEACHER_FILE = "the .pth file written by training (teacher_checkpoint.pth)"


def load_torch_file(path: str | os.PathLike, map_location="cpu", weights_only: bool = True,
                    expected: str = TEACHER_FILE, hint: str = HINT) -> tuple[Path, Any]:
    """``torch.load`` with errors that name the file, say what it is instead, and what to pass.

    Args:
        path: the file.
        map_location, weights_only: of ``torch.load``.
        expected: what the caller wants, for the messages (e.g. "the best_model.pth of ...").
        hint: where the path came from (flag or config key), appended to the messages.

    Returns:
        ``(path, loaded object)``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a file, not a torch.save archive (a text file, a NIfTI image, ...),
            truncated, or refused by safe loading.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint file not found: {path}. Pass {expected}. {hint}")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint path {path} is not a file. {hint}")
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        with open(path, "rb") as fh:
            if fh.read(len(_LEGACY_TORCH_HEADER)) != _LEGACY_TORCH_HEADER:
                raise CheckpointError(
                    f"{path} is not a PyTorch checkpoint ({_describe_non_checkpoint(path)}). "
                    f"Pass {expected}. {hint}")
    # No mmap: parameters backed by the file would crash (SIGBUS) if it were overwritten in place.
    try:
        obj = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name and a fix
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if weights_only and "weights only" in str(exc).lower():
            raise CheckpointError(
                f"{path} holds Python objects that safe loading (torch.load weights_only=True) refuses: "
                f"{first_line} ... Re-save it with plain containers (dicts, lists, numbers, strings, tensors), "
                "or, only if you trust its source, load it with weights_only=False "
                "(that can execute code stored in the file).") from exc
        raise CheckpointError(f"Could not read checkpoint {path} (corrupt or truncated?): {first_line}") from exc
    return path, obj


def _finetuned_segmentation_error(path: Path, obj: Mapping) -> FinetunedModelError | None:
    """The error for a segmentation finetuning output given where a backbone is expected, else None."""
    if obj.get("format") == FINETUNED_SEGMENTATION_FORMAT:
        kind = "a finetuned segmentation model (best_model.pth of python -m dinov2.eval.segmentation)"
        config = obj.get("config") if isinstance(obj.get("config"), Mapping) else {}
        source = config.get("pretrained_weights")
        model_cfg = config.get("model") if isinstance(config.get("model"), Mapping) else {}
        trained = bool(model_cfg.get("train_backbone"))
    elif "frozen_from" in obj and isinstance(obj.get("model"), Mapping):
        kind = "the resumable state of a segmentation finetuning run (last_checkpoint.pth)"
        source, trained = obj.get("frozen_from"), False
    else:
        return None
    parts = [f"{path} is {kind}, not a backbone/teacher checkpoint."]
    if is_random_init(source):
        parts.append("Its backbone was randomly initialised (--pretrained-weights none): no teacher checkpoint "
                     "lies behind it. Pass a teacher_checkpoint.pth, or --pretrained-weights none for the "
                     "random-init baseline.")
    elif source:
        parts.append(f"Its backbone was finetuned from {source}: pass that file with --pretrained-weights"
                     + (" (the finetuned run also trained the backbone, so its weights differ)." if trained else "."))
    else:
        parts.append("Pass the teacher_checkpoint.pth it was finetuned from with --pretrained-weights.")
    # last_checkpoint.pth may lack a frozen backbone; best_model.pth beside it always holds it all.
    best = path if obj.get("format") == FINETUNED_SEGMENTATION_FORMAT else path.with_name("best_model.pth")
    parts.append(f"To use the finetuned backbone itself (the 'backbone.' keys of {best}), in Python: "
                 "from dinov2.checkpoints import load_finetuned; "
                 f"backbone = load_finetuned('{best}')[0].backbone")
    return FinetunedModelError(" ".join(parts))


# ----------------------------------------------------------------------------- key normalisation
def normalize_state_dict_keys(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str], bool]:
    """Drop wrapper segments and unchunk block names.

    ``module.`` / ``_orig_mod.`` segments are removed wherever they appear, and
    ``blocks.<chunk>.<global index>.<param>`` becomes ``blocks.<global index>.<param>`` (also
    under a prefix such as ``backbone.``).

    Args:
        state_dict: name -> tensor.

    Returns:
        ``(renamed dict, sorted removed prefixes, whether chunked block names were found)``.

    Raises:
        CheckpointError: two names collapse to one (e.g. the same block in two chunks).
    """
    out: dict[str, Any] = {}
    stripped: set[str] = set()
    chunked = False
    for key, value in state_dict.items():
        parts = key.split(".")
        kept = [p for p in parts if p not in TRANSPARENT_SEGMENTS]
        stripped.update(p + "." for p in parts if p in TRANSPARENT_SEGMENTS)
        new = ".".join(kept)
        prefix, sep, rest = new.partition("blocks.")
        if sep and (not prefix or prefix.endswith(".")):
            m = _CHUNKED_BLOCK.match(sep + rest)
            if m:
                new = f"{prefix}blocks.{m.group(2)}.{m.group(3)}"
                chunked = True
        if new in out:
            raise CheckpointError(f"Parameter name '{new}' occurs twice after normalising '{key}'")
        out[new] = value
    return out, sorted(stripped), chunked


def _split_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def read_checkpoint(path: str | os.PathLike, map_location="cpu", weights_only: bool = True,
                    hint: str = HINT) -> CheckpointContents:
    """Load a checkpoint file and split it into backbone, heads and the rest.

    Args:
        path: ``.pth`` file in any supported layout (see the module docstring).
        map_location: passed to ``torch.load``.
        weights_only: safe loading (default). Set False only for files you trust.
        hint: where the path came from (flag or config key), appended to the messages.

    Returns:
        :class:`CheckpointContents` with flat, prefix-free backbone names.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: not a checkpoint, unreadable, newer format, no tensors in it, or a
            finetuned segmentation model (the message names the teacher it came from).
    """
    path, obj = load_torch_file(path, map_location, weights_only, hint=hint)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors. {hint}")
    finetuned = _finetuned_segmentation_error(path, obj)
    if finetuned is not None:  # checked first: its head.* keys would otherwise fail key normalisation obscurely
        raise finetuned
    top_level = [str(k) for k in obj]
    version = obj.get("format_version")
    if isinstance(version, int) and version > TEACHER_FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {version}; this toolkit reads up to "
                              f"{TEACHER_FORMAT_VERSION}. Update the toolkit to load it.")
    wrapper = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    state = obj[wrapper] if wrapper else obj
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} contains no tensors (top-level keys: {preview_keys(top_level)}). {hint}")
    tensors, stripped, chunked = normalize_state_dict_keys(tensors)
    # A whole meta-architecture (student.* and teacher.*) saved as one state dict: take the teacher.
    for role in ("teacher.", "student."):
        if any(k.startswith(role) for k in tensors):
            tensors = _split_prefix(tensors, role)
            stripped.append(role)
            break
    if any(k.startswith("backbone.") for k in tensors):
        backbone = _split_prefix(tensors, "backbone.")
        stripped.append("backbone.")
        rest = {k: v for k, v in tensors.items() if not k.startswith("backbone.")}
    else:
        backbone, rest = {}, {}
        for k, v in tensors.items():
            (rest if k.split(".")[0].endswith("_head") else backbone)[k] = v
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in rest.items():
        name = k.split(".")[0]
        if name.endswith("_head") and "." in k:
            heads.setdefault(name, {})[k[len(name) + 1:]] = v
    other = sorted(k for k in rest if k.split(".")[0] not in heads)

    config = obj.get("config") if isinstance(obj.get("config"), Mapping) else None
    iteration = obj.get("iteration") if isinstance(obj.get("iteration"), int) else None
    if version == TEACHER_FORMAT_VERSION and wrapper == "teacher":
        source = "dinov2_3d_teacher_v1"
    elif wrapper == "teacher" and config is None and "backbone." in stripped:
        source = "3dino_published"
    else:
        source = f"wrapped:{wrapper}" if wrapper else "plain_state_dict"
    return CheckpointContents(
        path=path, source_format=source, backbone=backbone, heads=heads, other_keys=other,
        top_level_keys=top_level, wrapper_key=wrapper, stripped_prefixes=stripped, chunked_blocks=chunked,
        config=dict(config) if config is not None else None, iteration=iteration,
    )


def load_head_state_dicts(path: str | os.PathLike, map_location="cpu",
                          weights_only: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Head state dicts of a checkpoint, e.g. ``{"dino_head": {"mlp.0.weight": ..., ...}}``.

    Args:
        path: checkpoint file (see :func:`read_checkpoint`).
        map_location, weights_only: passed to ``torch.load``.

    Returns:
        head name -> state dict with the ``<name>.`` prefix stripped (empty if no heads).
    """
    return read_checkpoint(path, map_location, weights_only).heads
