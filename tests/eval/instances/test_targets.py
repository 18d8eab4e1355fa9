"""The per-object normalised distance target."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from dinov2.eval.instances.targets import distance_target

THIRD = 1.0 / 3.0


def test_touching_cubes_have_a_valley(touching_cubes):
    target = distance_target(touching_cubes)
    # each 5-voxel cube: distances 1, 2, 3, 2, 1 to the nearest voxel that is not the cube,
    # divided by the cube's maximum 3; the shared face is boundary for BOTH cubes
    expected = [0, THIRD, 2 * THIRD, 1, 2 * THIRD, THIRD, THIRD, 2 * THIRD, 1, 2 * THIRD, THIRD, 0]
    np.testing.assert_allclose(target[:, 3, 3], expected, atol=1e-6)
    assert target[5, 3, 3] < target[3, 3, 3] and target[6, 3, 3] < target[8, 3, 3]


def test_foreground_distance_has_no_valley(touching_cubes):
    # the contrast: a distance transform of the binary foreground (1, 2, 3, 3, ..., 3, 2, 1)
    # is flat across the shared face, so nothing there tells the two cubes apart
    foreground = ndi.distance_transform_edt(touching_cubes > 0)[:, 3, 3]
    assert foreground[5] == foreground[6] == foreground.max()


def test_each_object_peaks_at_one(touching_cubes):
    labels = touching_cubes.copy()
    labels[labels == 2] = 9  # ids need not be consecutive
    labels[0, 0, 0] = 4  # a one-voxel object: its only voxel is its maximum
    target = distance_target(labels)
    assert target.dtype == np.float32 and target.shape == labels.shape
    for k in (1, 4, 9):
        assert target[labels == k].max() == pytest.approx(1.0)
    assert np.all(target[labels == 0] == 0) and np.all(target[labels > 0] > 0)


def test_anisotropic_spacing():
    labels = np.zeros((9, 9, 9), dtype=np.int16)
    labels[1:8, 1:8, 1:8] = 1  # a 7^3 voxel box, 7 x 7 x 14 mm with spacing (1, 1, 2)
    target = distance_target(labels, spacing=(1.0, 1.0, 2.0))
    # along x through the centre: 1, 2, 3, 4, 3, 2, 1 mm to the x faces (the z faces are 8 mm
    # away); the object's maximum is 4 mm at the centre
    np.testing.assert_allclose(target[1:8, 4, 4], [0.25, 0.5, 0.75, 1, 0.75, 0.5, 0.25])
    # along z: 2, 4, 6, 8, ... mm to the z faces, but never more than the 4 mm to the x faces
    np.testing.assert_allclose(target[4, 4, 1:8], [0.5, 1, 1, 1, 1, 1, 0.5])
    # isotropic voxels: the same profile along both axes
    iso = distance_target(labels)
    np.testing.assert_allclose(iso[1:8, 4, 4], iso[4, 4, 1:8])


def test_object_at_the_volume_edge_has_a_boundary():
    # an object filling the whole volume: outside the volume counts as boundary
    target = distance_target(np.ones((3, 3, 3), dtype=np.uint8))
    assert target[1, 1, 1] == pytest.approx(1.0) and target[0, 0, 0] == pytest.approx(0.5)


def test_rejects_float_labels_and_bad_spacing(touching_cubes):
    with pytest.raises(ValueError, match="integers"):
        distance_target(touching_cubes.astype(np.float32))
    with pytest.raises(ValueError, match="spacing"):
        distance_target(touching_cubes, spacing=(1.0, 1.0))
