"""Bad-file builders and helpers shared by the bad-input matrix (issue #14).

Every builder ``make(path) -> path`` writes one kind of input at ``path`` (parents created) and
returns it. The image kinds (:data:`IMAGE_KINDS`) are tiny volumes (16^3 unless the kind is about
size); the label kinds (:data:`LABEL_KINDS`) are label maps that do not fit a good 16^3 image of
:func:`good` with the classes 0/1 of the tiny presets. Test modules reach them through the
``bad`` fixture (under ``--import-mode=importlib`` a conftest cannot be imported).

Helpers assert the entry-point contract of a user error: exit code 1, one ``ERROR:`` line on
stderr naming the file, no traceback, and none of the command's output files.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Callable, Iterable

import nibabel as nib
import numpy as np
import pytest

SHAPE = (16, 16, 16)
SMALL_SHAPE = (6, 6, 6)  # below every crop / window / image size of the tiny runs (16 or 32)


# ------------------------------------------------------------------------------------------ volumes
def volume(seed: int = 0, shape=SHAPE) -> np.ndarray:
    """A box brighter than its noisy surroundings (so foreground, PCA and Dice all have something)."""
    data = np.random.default_rng(seed).uniform(0, 10, size=shape).astype(np.float32)
    lo = [s // 4 for s in shape[:3]]
    hi = [s - s // 4 for s in shape[:3]]
    data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] += 100
    return data


def box_label(shape=SHAPE, value: int = 1) -> np.ndarray:
    """The label map of :func:`volume`: ``value`` inside the bright box, 0 elsewhere."""
    label = np.zeros(shape, np.uint8)
    lo = [s // 4 for s in shape]
    hi = [s - s // 4 for s in shape]
    label[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = value
    return label


def save(path: Path, data: np.ndarray, affine=None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def good(path: Path, seed: int = 0) -> Path:
    return save(path, volume(seed))


def empty(path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def truncated(path: Path) -> Path:
    """A gzip cut in half: the header still reads, the voxels do not (an interrupted copy)."""
    data = np.random.default_rng(0).uniform(0, 1, size=SHAPE).astype(np.float32)  # incompressible
    full = gzip.compress(nib.Nifti1Image(data, np.eye(4)).to_bytes())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(full[: len(full) // 2])
    return path


def random_bytes(path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    return path


def two_d(path: Path) -> Path:
    return save(path, volume(shape=(16, 16, 1))[..., 0])


def four_d(path: Path) -> Path:
    """Three frames of the same box."""
    return save(path, np.stack([volume(seed=t) for t in range(3)], axis=-1))


def five_d(path: Path) -> Path:
    return save(path, np.stack([volume()] * 2, axis=-1)[..., None, :])


def all_nan(path: Path) -> Path:
    return save(path, np.full(SHAPE, np.nan, dtype=np.float32))


def some_inf(path: Path) -> Path:
    """A good volume with one +Inf, one -Inf and one NaN voxel (tolerated: one warning)."""
    data = volume()
    data[0, 0, 0], data[1, 2, 3], data[2, 2, 2] = np.inf, -np.inf, np.nan
    return save(path, data)


def small(path: Path) -> Path:
    """A volume smaller than every crop, window and image size of the tiny runs."""
    return save(path, volume(shape=SMALL_SHAPE))


IMAGE_KINDS: dict[str, Callable[[Path], Path]] = {
    "empty": empty, "truncated_gzip": truncated, "random_bytes": random_bytes, "2d": two_d, "4d": four_d,
    "5d": five_d, "all_nan": all_nan, "some_inf": some_inf, "smaller_than_crop": small,
}


# ------------------------------------------------------------------------------------ label maps
def label_shape_mismatch(path: Path) -> Path:
    return save(path, np.zeros((16, 16, 12), np.uint8))


def label_affine_mismatch(path: Path) -> Path:
    return save(path, box_label(), np.diag([1.0, 1.0, 3.0, 1.0]))


def label_values_outside(path: Path) -> Path:
    """Classes 0/1 of the tiny presets, plus 7 in one corner (another dataset's map)."""
    label = box_label()
    label[0, 0, 0] = 7
    return save(path, label)


LABEL_KINDS: dict[str, Callable[[Path], Path]] = {
    "label_shape_mismatch": label_shape_mismatch, "label_affine_mismatch": label_affine_mismatch,
    "label_values_outside_classes": label_values_outside,
}


# ------------------------------------------------------------------------------------ datalists
def not_json(path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"training": [{"image": "a.nii.gz", \n')  # cut short
    return path


def write_json(path: Path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


# ----------------------------------------------------------------------------------- checkpoints
def text_file(path: Path) -> Path:
    """A text file named like a checkpoint (a download that saved an error page, a pointer file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("model weights are on the shared drive\n")
    return path


def vit_2d_checkpoint(path: Path) -> Path:
    """A 2D ViT-S/14 state dict (another architecture): 3-channel 14x14 patches, 16x16 + 1 tokens.

    Only the tensors the readers look at, zero-filled (a few MB)."""
    import torch

    dim = 384
    state = {"cls_token": torch.zeros(1, 1, dim), "pos_embed": torch.zeros(1, 257, dim),
             "patch_embed.proj.weight": torch.zeros(dim, 3, 14, 14), "patch_embed.proj.bias": torch.zeros(dim),
             "blocks.0.attn.qkv.weight": torch.zeros(3 * dim, dim),
             "blocks.0.mlp.fc1.weight": torch.zeros(4 * dim, dim)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


# ------------------------------------------------------------------------------------- asserting
def outputs(folder: Path, names: Iterable[str]) -> list[str]:
    """The files of ``names`` (glob patterns, searched recursively) that exist under ``folder``."""
    folder = Path(folder)
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for pattern in names for p in folder.rglob(pattern))


@pytest.fixture(scope="session")
def bad():
    """This module's builders and helpers, as attributes (``bad.truncated(path)``, ``bad.IMAGE_KINDS``)."""
    import types

    return types.SimpleNamespace(**{k: v for k, v in globals().items() if not k.startswith("_")})


@pytest.fixture()
def user_error(capsys, caplog):
    """``user_error(code, *names, outputs_in=(folder, patterns))``: assert the contract of a user
    error and return its ``ERROR:`` line.

    Exit code 1; exactly one ``ERROR:`` line on stderr, naming each of ``names``; no traceback on
    stderr, stdout or in the log records; none of the output files ``patterns`` under ``folder``.
    """

    def check(code: int, *names, outputs_in: tuple[Path, Iterable[str]] | None = None) -> str:
        captured = capsys.readouterr()
        text = captured.err + captured.out + caplog.text
        assert "Traceback" not in text, text
        lines = [line for line in captured.err.splitlines() if line.startswith("ERROR:")]
        assert code == 1, (code, captured.err)
        assert len(lines) == 1, captured.err
        for name in names:
            assert str(name) in lines[0], (str(name), lines[0])
        if outputs_in is not None:
            assert outputs(*outputs_in) == [], outputs(*outputs_in)
        return lines[0]

    return check


class PreflightPassed(Exception):
    """Raised by a test in place of the step after an entry point's pre-flight: the inputs passed."""


def warnings_naming(caplog, path: Path) -> list[str]:
    """The WARNING records that name ``path``."""
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and str(path) in r.getMessage()]


@pytest.fixture()
def fresh_nonfinite_warnings(monkeypatch):
    """Forget which files were already warned about (once per file and process), so a test sees its warning."""
    from dinov2.data import validation

    monkeypatch.setattr(validation, "_warned", set())


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one intra-op thread (``one_thread`` of tests/conftest.py)."""
    yield
