"""Stacks to model inputs and distance targets: resampling, padding, crops, the datalist pre-flight."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from dinov2.data.datalist.format import DatalistError
from dinov2.eval.instances.data import (Preprocessing, distance_map, load_cases, model_input, to_stack_grid,
                                        training_dataset)
from dinov2.eval.instances.io import read_image, read_labels
from dinov2.utils.config import ConfigError

from .ball_stacks import touching_balls, write_ball_datalist, write_tiff

INTENSITY = {"mode": "percentile", "lower": 1.0, "upper": 99.0, "b_min": 0.0, "b_max": 1.0}
AUGMENT = {"flip_prob": 0.5, "rot90_prob": 0.5, "intensity_prob": 0.0, "scale_intensity": 0.0, "shift_intensity": 0.0}


@pytest.fixture()
def stack_pair(tmp_path):
    image, labels = touching_balls((24, 20, 8), (1.0, 1.0, 3.0), seed=3)
    write_tiff(tmp_path / "im.tif", image, (1.0, 1.0, 3.0))
    write_tiff(tmp_path / "lab.tif", labels.astype(np.uint16), (1.0, 1.0, 3.0))
    image_stack = read_image(tmp_path / "im.tif")
    return image_stack, read_labels(tmp_path / "lab.tif", like=image_stack)


def test_target_spacing_makes_anisotropic_stacks_isotropic(stack_pair):
    image, labels = stack_pair
    prep = Preprocessing(INTENSITY, target_spacing=(1.5, 1.5, 1.5), roi_size=(16, 16, 16))
    shape, spacing = prep.grid(image)
    assert shape == (16, 13, 16) and spacing == pytest.approx((1.5, 20 / 13, 1.5))
    x = model_input(image, prep)
    assert x.shape == (1, 16, 13, 16) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    target = distance_map(labels, prep)[0].numpy()
    assert target.shape == shape and target.min() == 0.0
    # every object that survives the resampling peaks at exactly 1; the background stays 0
    resampled = torch.nn.functional.interpolate(torch.from_numpy(labels.array[None, None]).float(), size=shape,
                                                mode="nearest-exact")[0, 0].long().numpy()
    for object_id in np.unique(resampled)[1:]:
        assert target[resampled == object_id].max() == pytest.approx(1.0)
    assert np.all(target[resampled == 0] == 0)


def test_predictions_return_to_the_stack_grid(stack_pair):
    image, _ = stack_pair
    prep = Preprocessing(INTENSITY, scale=2.0, roi_size=(16, 16, 16))
    assert prep.grid(image)[0] == (48, 40, 16)
    ramp = torch.linspace(0, 1, 48)[:, None, None].expand(48, 40, 16)[None]
    back = to_stack_grid(ramp, image)
    assert back.shape == image.shape and back.dtype == np.float32
    assert np.all(np.diff(back[:, 0, 0]) > 0)  # the X axis stays the X axis


def test_crops_are_padded_to_the_window_and_augmented_together(stack_pair):
    image, labels = stack_pair
    case = type("Case", (), {"image": image, "labels": labels})
    prep = Preprocessing(INTENSITY, scale=1.0, roi_size=(32, 16, 32))
    with pytest.raises(ConfigError, match="rot90_prob"):
        training_dataset([case], prep, 2, AUGMENT)
    dataset = training_dataset([case], Preprocessing(INTENSITY, scale=1.0, roi_size=(32, 32, 32)), 3, AUGMENT)
    crops = dataset[0]
    assert len(crops) == 3
    for crop in crops:
        assert crop["image"].shape == (1, 32, 32, 32) and crop["label"].shape == (1, 32, 32, 32)
        # the stack (24 x 20 x 8) is padded with background; objects peak at 1
        assert (crop["label"] == 0).float().mean() > 0.5 and float(crop["label"].max()) == pytest.approx(1.0)
    # image and target are flipped / rotated together: with an image that IS the target (up to the
    # intensity scaling), every crop's image still matches its target voxel for voxel
    mirror = type("Case", (), {"image": replace(image, array=100 + 800 * distance_map(labels, prep)[0].numpy()),
                               "labels": labels})
    unpadded = training_dataset([mirror], Preprocessing(INTENSITY, scale=1.0, roi_size=(20, 20, 8)), 8, AUGMENT)
    for crop in unpadded[0]:
        correlation = np.corrcoef(crop["image"].ravel().numpy(), crop["label"].ravel().numpy())[0, 1]
        assert correlation > 0.97


def test_unlabelled_training_entries_and_bad_scales_are_refused(tmp_path):
    datalist = write_ball_datalist(tmp_path)
    data = json.loads(datalist.read_text())
    del data["training"][0]["label"]
    data["validation"] = []
    datalist.write_text(json.dumps(data))
    with pytest.raises(DatalistError) as error:
        load_cases(datalist)
    assert "training[0]" in str(error.value) and "no instance label stack" in str(error.value)
    assert "no validation entries" in str(error.value)
    with pytest.raises(ConfigError, match="dataset.scale"):
        Preprocessing.from_config({"scale": 0, "target_spacing": None, "image_size": 16, "intensity": INTENSITY})
