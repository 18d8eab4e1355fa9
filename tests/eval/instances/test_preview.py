"""PNG previews of instance labels (dinov2/eval/instances/preview.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dinov2.eval.instances.preview import OVERLAY_ALPHA, instance_overlay, object_colours, write_preview
from dinov2.eval.visualisation.montage import gray


def _cubes() -> tuple[np.ndarray, np.ndarray]:
    """``(image, labels)`` ``(20, 16, 12)``: two touching 5-voxel cubes (ids 3, 7) at the centre."""
    labels = np.zeros((20, 16, 12), np.int32)
    labels[5:10, 5:10, 4:9] = 3
    labels[10:15, 5:10, 4:9] = 7
    image = np.where(labels > 0, 1.0, 0.0).astype(np.float32)
    return image, labels


def test_each_object_has_its_own_colour_from_its_id():
    colours = object_colours(np.arange(1, 301))
    assert colours.shape == (300, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours}) == 300
    np.testing.assert_array_equal(object_colours([7, 3]), colours[[6, 2]])  # depends on the id only


def test_overlay_fills_objects_and_outlines_them_opaque():
    image, labels = _cubes()
    base = gray(image * 2 - 1)
    overlay = instance_overlay(base, labels)
    three, seven = object_colours([3, 7])
    np.testing.assert_array_equal(overlay[labels == 0], base[labels == 0])
    np.testing.assert_array_equal(overlay[5, 7, 6], three)  # on the outline (x = 5 faces background)
    np.testing.assert_array_equal(overlay[10, 7, 6], seven)  # on the shared face: outlined too
    inner = (1 - OVERLAY_ALPHA) * base[7, 7, 6] + OVERLAY_ALPHA * three
    np.testing.assert_array_equal(overlay[7, 7, 6], inner.round().astype(np.uint8))


def _panels_with(picture: np.ndarray, colour: np.ndarray, tolerance: int = 8) -> int:
    """How many separate column ranges (panels) hold pixels of ``colour`` (panel resizing blends a
    little, hence the tolerance)."""
    close = np.abs(picture.astype(int) - colour.astype(int)).max(axis=-1) <= tolerance
    columns = np.flatnonzero(close.any(axis=0))
    return int(columns.size > 0) + int((np.diff(columns) > 5).sum())


def test_preview_png_shows_each_object_in_one_colour_in_every_panel_it_crosses(tmp_path):
    image, labels = _cubes()
    path = write_preview(tmp_path / "sub" / "preview.png", image, labels, spacing=(1.0, 1.0, 2.0))
    picture = np.asarray(Image.open(path).convert("RGB"))
    half = picture.shape[0] // 2
    three, seven = object_colours([3, 7])
    # the image row is grey; on the labels row the axial and coronal planes cross both cubes, and
    # the sagittal one (mid-X) runs along the face of cube 7
    assert _panels_with(picture[:half], three) == _panels_with(picture[:half], seven) == 0
    assert _panels_with(picture[half:], three) == 2
    assert _panels_with(picture[half:], seven) == 3
    with pytest.raises(ValueError, match="one shape"):
        write_preview(tmp_path / "bad.png", image, labels[:-1])
