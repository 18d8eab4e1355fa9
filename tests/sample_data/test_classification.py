"""The brain-lobe patch classification sample (dinov2/sample_data/classification.py)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from dinov2.sample_data.classification import (
    HARVARD_OXFORD_REGIONS,
    LOBES,
    PatchTaskParams,
    lobe_index_map,
    plan_patch_sites,
    template_on_atlas_grid,
)
from dinov2.sample_data.labels import harvard_oxford_label_map


def test_lobe_table_covers_every_harvard_oxford_region():
    assert sorted(HARVARD_OXFORD_REGIONS) == list(range(1, 49))
    assert {lobe for _, lobe in HARVARD_OXFORD_REGIONS.values()} == set(LOBES)
    regions, _ = harvard_oxford_label_map()
    lobes = lobe_index_map(regions)
    assert np.array_equal(lobes < 0, regions == 0)
    assert HARVARD_OXFORD_REGIONS[48][0] == "Occipital Pole" and lobes[regions == 48].max() == LOBES.index("occipital")


def _box(site, p):
    return [(o, o + p) for o in site.origin]


def _intersects(a, b):
    return all(lo1 < hi2 and lo2 < hi1 for (lo1, hi1), (lo2, hi2) in zip(a, b))


def test_splits_never_share_a_voxel_and_labels_are_the_centre_lobe():
    regions, affine = harvard_oxford_label_map()
    lobes = lobe_index_map(regions)
    params = PatchTaskParams()  # the default dense grid
    sites = plan_patch_sites(lobes, regions, affine, params)
    p = params.patch_size
    by_split = {s: [t for t in sites if t.split == s] for s in ("training", "validation", "test")}
    assert all(by_split.values())
    midline = 45  # world x = 0 on the 2 mm MNI grid
    for t in by_split["training"] + by_split["validation"]:
        assert t.origin[0] + p <= midline and t.hemisphere == "right"
    for t in by_split["test"]:
        assert t.origin[0] > midline and t.hemisphere == "left"
    # validation lies in the axial band z in [0, 32) mm = voxel rows [36, 52); training avoids it
    for t in by_split["validation"]:
        assert 36 <= t.origin[2] and t.origin[2] + p <= 52
    for t in by_split["training"]:
        assert t.origin[2] + p <= 36 or t.origin[2] >= 52
    assert not any(_intersects(_box(a, p), _box(b, p))
                   for a in by_split["training"][::7] for b in by_split["validation"])
    for t in sites[::11]:
        centre = tuple(o + p // 2 for o in t.origin)
        assert regions[centre] == t.region and LOBES[lobes[centre]] == t.lobe
    assert {t.lobe for t in by_split["validation"]} == set(LOBES)


def test_written_patches_hold_the_template_at_their_world_position(lobe_data):
    data = json.loads(lobe_data.read_text())
    assert data["labels"] == {str(i): name for i, name in enumerate(LOBES)}
    regions, atlas_affine = harvard_oxford_label_map()
    inverse = np.linalg.inv(atlas_affine)
    left = next(e for e in data["test"] if e["template"] == "mni152_t1_2mm")
    right = next(e for e in data["training"] if e["template"] == "mni152_t1_2mm")
    volume = template_on_atlas_grid("mni152_t1_2mm", atlas_affine, regions.shape)
    for entry in (left, right):
        image = nib.load(lobe_data.parent / entry["image"])
        patch = np.asarray(image.dataobj)
        assert patch.shape == (16, 16, 16) and patch.min() >= -1 and patch.max() <= 1
        ijk = np.stack(np.meshgrid(*[np.arange(16)] * 3, indexing="ij"), -1).reshape(-1, 3)
        atlas_ijk = np.rint(nib.affines.apply_affine(inverse @ image.affine, ijk)).astype(int)
        np.testing.assert_allclose(patch.reshape(-1), volume[tuple(atlas_ijk.T)], atol=1e-6)
        centre_world = nib.affines.apply_affine(atlas_affine, atlas_ijk.min(0) + 8)
        assert np.allclose(centre_world, entry["center_mm"])
        assert entry["hemisphere"] == ("left" if centre_world[0] < 0 else "right")
    # left patches are mirrored: their first array axis points away from the midline like right ones
    assert np.linalg.det(nib.load(lobe_data.parent / left["image"]).affine[:3, :3]) > 0
    assert np.linalg.det(nib.load(lobe_data.parent / right["image"]).affine[:3, :3]) < 0


