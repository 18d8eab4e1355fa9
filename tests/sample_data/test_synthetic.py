"""Synthetic pretraining volumes (dinov2/sample_data/synthetic.py): shape, layout, seeds, and a datalist the pipeline reads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dinov2.sample_data.synthetic import synthetic_volume, write_synthetic_datalist


def test_volume_is_smooth_texture_inside_an_ellipsoid():
    volume = synthetic_volume((40, 44, 36), seed=3)
    assert volume.shape == (40, 44, 36) and volume.dtype == np.float32
    assert volume[0, 0, 0] == 0 and volume[20, 22, 18] >= 100  # background corner, foreground centre
    inside = volume[volume > 0]
    assert 100 <= inside.min() and inside.max() <= 1100 and inside.std() > 50
    # smooth: neighbours differ far less than the texture's spread
    assert np.abs(np.diff(volume[10:30, 12:32, 9:27], axis=0)).mean() < 0.2 * inside.std()
    assert np.array_equal(volume, synthetic_volume((40, 44, 36), seed=3))
    assert not np.array_equal(volume, synthetic_volume((40, 44, 36), seed=4))


def test_too_small_or_not_3d_is_refused():
    for shape in ((4, 40, 40), (40, 40)):
        with pytest.raises(ValueError, match="every side >= 8"):
            synthetic_volume(shape)


def test_datalist_lists_every_volume_with_its_grid(tmp_path):
    from dinov2.data.datalist import load_pretrain_datalist

    path = write_synthetic_datalist(tmp_path / "volumes", count=2, shape=(24, 20, 16), seed=7)
    entries = json.loads(path.read_text())
    assert [e["shape"] for e in entries] == [[24, 20, 16]] * 2 and all(e["spacing"] == [1.0] * 3 for e in entries)
    assert len(load_pretrain_datalist(path)) == 2
