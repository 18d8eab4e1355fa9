"""The threshold + connected components baseline (dinov2/eval/instances/baseline.py)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from dinov2.eval.instances import io
from dinov2.eval.instances.baseline import main, threshold_components
from dinov2.eval.instances.metrics import instance_scores

pytest.importorskip("skimage", reason="Otsu's threshold needs the optional extra 'instances'")
tifffile = pytest.importorskip("tifffile")

SHAPE = (40, 24, 20)


def _balls(centres, radius=5.0) -> np.ndarray:
    """``(X, Y, Z)`` int32 labels: ball ``i + 1`` around ``centres[i]`` (later balls win overlaps)."""
    grid = np.indices(SHAPE).astype(np.float64)
    labels = np.zeros(SHAPE, np.int32)
    for i, centre in enumerate(centres):
        inside = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2
        labels[inside] = i + 1
    return labels


def _image(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Bright objects on a dark background with bounded noise (+-10, far below the contrast of 150)."""
    noise = np.random.default_rng(seed).uniform(-10, 10, SHAPE)
    return (np.where(labels > 0, 200.0, 50.0) + noise).astype(np.float32)


def test_two_separated_balls_are_two_objects():
    reference = _balls([(10, 12, 10), (29, 12, 10)])
    labels = threshold_components(_image(reference))
    assert labels.max() == 2
    scores = instance_scores(reference, labels)
    assert scores.seg == 1.0 and scores.f1 == 1.0


def test_two_touching_balls_merge_into_one_which_is_the_baselines_weakness():
    reference = _balls([(14, 12, 10), (24, 12, 10)])  # centres 10 apart, radius 5: they touch
    assert reference.max() == 2
    labels = threshold_components(_image(reference))
    assert labels.max() == 1
    np.testing.assert_array_equal(labels > 0, reference > 0)
    assert instance_scores(reference, labels).det < 1.0


def test_connectivity_and_minimum_size():
    image = np.zeros((6, 6, 6), np.float32)
    image[1:3, 1:3, 1:3] = image[3:5, 3:5, 3:5] = 1.0  # two cubes touching at one corner
    image[0, 5, 5] = 1.0  # a lone voxel
    assert threshold_components(image, threshold=0.5, connectivity=26).max() == 2
    six = threshold_components(image, threshold=0.5, connectivity=6)
    assert six.max() == 3
    assert threshold_components(image, threshold=0.5, connectivity=6, min_voxels=2).max() == 2
    assert threshold_components(image, threshold=1.0).max() == 0  # foreground is strictly above
    assert threshold_components(np.ones((4, 4, 4), np.float32)).max() == 0  # constant: no object


def test_smoothing_keeps_noise_from_joining_everything():
    reference = _balls([(10, 12, 10), (29, 12, 10)])
    noisy = _image(reference) + np.random.default_rng(1).normal(0, 45, SHAPE).astype(np.float32)
    # raw: bright noise voxels bridge the background, so no object is found on its own
    assert instance_scores(reference, threshold_components(noisy, min_voxels=10)).f1 == 0.0
    smoothed = threshold_components(noisy, smooth=1.0, min_voxels=10)
    assert smoothed.max() == 2 and instance_scores(reference, smoothed).f1 == 1.0


def test_command_writes_each_input_in_its_format(tmp_path, capsys):
    reference = _balls([(10, 12, 10), (29, 12, 10)])
    inputs = tmp_path / "in"
    inputs.mkdir()
    tifffile.imwrite(inputs / "cells.tif", _image(reference).transpose(2, 1, 0), imagej=True,
                     resolution=(1 / 0.5, 1 / 0.5), metadata={"axes": "ZYX", "spacing": 2.0, "unit": "micron"})
    affine = np.diag([0.8, 0.8, 1.2, 1.0])
    nib.save(nib.Nifti1Image(_image(reference, seed=1), affine), inputs / "scan.nii.gz")
    assert main([str(inputs), "--output", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "cells_instances.png", "cells_instances.tif", "scan_instances.nii.gz", "scan_instances.png"]
    tiff = io.read_labels(tmp_path / "out" / "cells_instances.tif")
    assert tiff.spacing == pytest.approx((0.5, 0.5, 2.0)) and instance_scores(reference, tiff.array).f1 == 1.0
    nifti = nib.load(tmp_path / "out" / "scan_instances.nii.gz")
    np.testing.assert_allclose(nifti.affine, affine)
    assert instance_scores(reference, np.asarray(nifti.dataobj).astype(np.int32)).f1 == 1.0
    assert "cells.tif: 2 objects" in capsys.readouterr().out


def test_command_reports_a_bad_input_in_one_line(tmp_path, capsys):
    (tmp_path / "broken.tif").write_bytes(b"nothing")
    assert main([str(tmp_path / "broken.tif"), "--output", str(tmp_path / "out"), "--no-preview"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ERROR: ") and "broken.tif" in err[-1]
