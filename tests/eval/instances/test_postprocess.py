"""Seeded watershed of a distance map into instance labels."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from scipy import ndimage as ndi

from dinov2.eval.instances.postprocess import instances_from_distance, min_size_voxels
from dinov2.eval.instances.targets import distance_target


def test_watershed_splits_touching_cubes_back_exactly(touching_cubes):
    labels = instances_from_distance(distance_target(touching_cubes), cells_max=0.5, cell_fill=0.1)
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, touching_cubes)


def test_foreground_distance_merges_touching_cubes(touching_cubes):
    # the contrast: the normalised foreground distance has one plateau peak across both cubes,
    # hence one marker and one object
    foreground = ndi.distance_transform_edt(touching_cubes > 0)
    labels = instances_from_distance(foreground / foreground.max(), cells_max=0.5, cell_fill=0.1)
    np.testing.assert_array_equal(labels, (touching_cubes > 0).astype(np.int32))


def _with_small_object(touching_cubes):
    """The cubes (125 voxels each) and a separate 2^3 = 8-voxel object, as a target."""
    labels = np.pad(touching_cubes, ((0, 4), (0, 0), (0, 0)))
    labels[13:15, 2:4, 2:4] = 3
    return labels, distance_target(labels)


def test_minimum_size_in_voxels_and_ml(touching_cubes):
    labels, target = _with_small_object(touching_cubes)
    np.testing.assert_array_equal(instances_from_distance(target, 0.5, 0.1), labels)
    kept = instances_from_distance(target, 0.5, 0.1, min_voxels=9)
    np.testing.assert_array_equal(kept, np.where(labels == 3, 0, labels))
    # 2 mm voxels: 8 mm^3 = 0.008 mL each; 0.1 mL -> at least ceil(12.5) = 13 voxels
    assert min_size_voxels(0, 0.1, (2.0, 2.0, 2.0)) == 13
    in_ml = instances_from_distance(target, 0.5, 0.1, min_ml=0.1, spacing=(2.0, 2.0, 2.0))
    np.testing.assert_array_equal(in_ml, kept)


def test_relabels_consecutively(touching_cubes):
    labels, target = _with_small_object(touching_cubes)
    labels[labels == 1] = 0  # now objects 2 and 3 only
    out = instances_from_distance(np.where(labels > 0, target, 0), 0.5, 0.1)
    assert sorted(np.unique(out).tolist()) == [0, 1, 2]


def test_region_without_marker_stays_background():
    dist = np.zeros((6, 6, 6), dtype=np.float32)
    dist[1:5, 1:5, 1:5] = 0.3  # above cell_fill, never above cells_max
    assert not instances_from_distance(dist, cells_max=0.5, cell_fill=0.1).any()


def test_bad_thresholds_and_sizes(touching_cubes):
    target = distance_target(touching_cubes)
    with pytest.raises(ValueError, match="cell_fill"):
        instances_from_distance(target, cells_max=0.3, cell_fill=0.3)
    with pytest.raises(ValueError, match="spacing"):
        instances_from_distance(target, 0.5, 0.1, min_ml=0.1)


def test_missing_scikit_image_names_the_extra(touching_cubes, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage.segmentation", None)  # the import now fails
    with pytest.raises(ImportError, match=r"pip install 'dinov2-3d\[instances\]'"):
        instances_from_distance(distance_target(touching_cubes), 0.5, 0.1)
