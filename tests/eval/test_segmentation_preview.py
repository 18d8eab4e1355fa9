"""PNG previews of predicted label maps: consistent colours, slices through the labels, a legend."""

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import torch

from dinov2.eval.segmentation.preview import display_scaled, validation_preview, write_preview
from dinov2.eval.segmentation.tracking import label_map
from dinov2.eval.visualisation.montage import LABEL_COLOURS, label_colour, label_montage


def colours_in(image: Image.Image) -> set[tuple[int, int, int]]:
    return {tuple(int(c) for c in px) for px in np.asarray(image).reshape(-1, 3)}


def test_each_label_value_keeps_its_colour_and_appears_in_the_legend():
    anatomy = np.zeros((20, 24, 16), dtype=np.float32)
    labels = np.zeros((20, 24, 16), dtype=np.int64)
    labels[4:9, 4:9, 4:9] = 2
    labels[12:17, 14:20, 8:12] = 5
    image = label_montage(anatomy, labels, np.diag([2.0, 2.0, 2.0, 1.0]), {2: "liver", 5: "spleen"})
    seen = colours_in(image)
    # The legend swatches are solid: exactly the colours of values 2 and 5, not that of value 1.
    assert label_colour(2)[1] in seen and label_colour(5)[1] in seen
    assert label_colour(1)[1] not in seen
    # The same value gets the same colour whatever else is present; values past the table wrap.
    assert label_colour(2) == LABEL_COLOURS[1]
    assert label_colour(len(LABEL_COLOURS) + 2) == LABEL_COLOURS[1]


def test_empty_prediction_still_gives_a_preview():
    image = label_montage(np.zeros((8, 8, 8)), np.zeros((8, 8, 8), dtype=np.int64), np.eye(4))
    assert image.width > 0 and label_colour(1)[1] not in colours_in(image)


def test_display_scaling_ignores_outliers_and_nan():
    volume = np.linspace(0, 1, 1000, dtype=np.float32).reshape(10, 10, 10)
    volume[0, 0, 0] = 1e6
    volume[0, 0, 1] = np.nan
    scaled = display_scaled(volume)
    assert scaled.shape == volume.shape and np.isfinite(scaled).all()
    assert scaled.min() == -1 and scaled.max() == 1
    assert np.median(scaled) == pytest.approx(0, abs=0.05)  # the outlier did not squash the range


def test_write_preview_refuses_labels_on_another_grid(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 6), np.uint8), np.eye(4)), tmp_path / "seg.nii.gz")
    with pytest.raises(ValueError, match="seg.nii.gz has shape"):
        write_preview(tmp_path / "img.nii.gz", tmp_path / "seg.nii.gz", tmp_path / "p.png", preset=None)


def test_validation_preview_puts_image_reference_and_prediction_side_by_side():
    anatomy = np.random.default_rng(0).normal(size=(20, 24, 16)).astype(np.float32)
    reference = np.zeros((20, 24, 16), dtype=np.int64)
    reference[4:9, 4:9, 6:10] = 2
    reference[0, 0, 8] = -1  # an ignore-label voxel is not drawn
    prediction = np.zeros_like(reference)
    prediction[12:17, 14:20, 6:10] = 3
    image = validation_preview(anatomy, reference, prediction, np.diag([2.0, 2.0, 2.0, 1.0]), {2: "liver", 3: "kidney"})
    # three axial panels of 20 x 24 voxels at 2 mm = 40 x 48 pixels, then the titles and the legend
    assert image.width == 3 * 40 and image.height > 48
    seen = colours_in(image)
    assert label_colour(2)[1] in seen and label_colour(3)[1] in seen  # legend swatches of both maps
    assert label_colour(-1)[1] not in seen  # the ignore label has no legend entry


def test_label_map_of_classes_and_of_regions():
    classes = torch.nn.functional.one_hot(torch.tensor([[[0, 2, 1]]]), 3).permute(3, 0, 1, 2).float()  # (K, 1, 1, 3)
    assert label_map(classes, multilabel=False).tolist() == [[[0, 2, 1]]]
    regions = torch.tensor([[[[1.0, 1.0, 0.0]]], [[[0.0, 1.0, 0.0]]]])  # region 1 inside region 0
    assert label_map(regions, multilabel=True).tolist() == [[[1, 2, 0]]]
