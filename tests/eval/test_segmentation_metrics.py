"""Dice / HD95 against hand-made masks, including classes absent from a case (more in test_metrics_conventions.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinov2.eval.segmentation.metrics import case_metrics, discretize, label_to_masks, summarize
from dinov2.utils.jsonsafe import json_safe


def masks(shape=(10, 10, 10), channels=5):
    return torch.zeros(1, channels, *shape), torch.zeros(1, channels, *shape)


def test_case_metrics_on_hand_made_masks():
    pred, target = masks()
    pred[0, 1, 2:6, 2:6, 2:6] = target[0, 1, 2:6, 2:6, 2:6] = 1     # class 1: identical cubes
    target[0, 2, 2:6, 2:6, 2:6] = 1                                  # class 2: shifted one voxel on axis 0
    pred[0, 2, 3:7, 2:6, 2:6] = 1
    pred[0, 3, 0:2, 0:2, 0:2] = 1                                    # class 3: absent from the ground truth
    target[0, 4, 7:9, 7:9, 7:9] = 1                                  # class 4: missed by the prediction
    pred[0, 0] = 1 - pred[0, 1:].amax(0)
    target[0, 0] = 1 - target[0, 1:].amax(0)
    spacing = (2.0, 1.0, 1.0)
    m = case_metrics(pred, target, spacing)
    assert m["dice"][1] == 1.0 and m["hd95"][1] == 0.0
    assert math.isclose(m["dice"][2], 2 * 48 / (64 + 64))          # 3 of 4 slices overlap
    assert math.isclose(m["hd95"][2], 2.0)                          # one voxel along the 2 mm axis
    assert m["dice"][3] == 0.0 and math.isnan(m["hd95"][3])         # spurious class: Dice 0, no distance
    assert m["dice"][4] == 0.0 and math.isnan(m["hd95"][4])         # missed class: Dice 0, no distance (not the diagonal)


def test_summaries_skip_absent_classes():
    names = ["background", "a", "b"]
    cases = [
        {"dice": np.array([0.9, 0.5, np.nan]), "hd95": np.array([1.0, 4.0, np.nan])},
        {"dice": np.array([0.7, 0.7, 0.2]), "hd95": np.array([3.0, 2.0, 8.0])},
    ]
    s = summarize(cases, names, foreground=[1, 2])
    assert s["dice"] == {"background": 0.8, "a": 0.6, "b": 0.2}
    assert math.isclose(s["mean_dice"], 0.4)
    assert math.isclose(s["mean_dice_with_background"], (0.8 + 0.6 + 0.2) / 3)
    assert math.isclose(s["mean_hd95"], (3.0 + 8.0) / 2)
    empty = summarize([{"dice": np.array([1.0, np.nan])}], ["background", "a"], foreground=[1])
    assert math.isnan(empty["mean_dice"]) and "hd95" not in empty
    assert json_safe(empty)["mean_dice"] is None


def test_discretize_and_label_masks():
    probs = torch.tensor([0.2, 0.7, 0.1]).view(1, 3, 1, 1, 1).expand(1, 3, 2, 2, 2)
    assert discretize(probs, multilabel=False)[0, :, 0, 0, 0].tolist() == [0, 1, 0]
    assert discretize(probs, multilabel=True)[0, :, 0, 0, 0].tolist() == [0, 1, 0]
    label = torch.tensor([0, 2]).view(1, 1, 2, 1, 1).float()
    onehot = label_to_masks(label, 3, multilabel=False)
    assert onehot[0, :, 0, 0, 0].tolist() == [1, 0, 0] and onehot[0, :, 1, 0, 0].tolist() == [0, 0, 1]


@pytest.mark.parametrize("seconds, text", [(0, "0:00:00"), (59.6, "0:01:00"), (3725, "1:02:05"),
                                           (2 * 86400 + 3600, "2d 1:00:00"), (-5, "0:00:00")])
def test_eta_format(seconds, text):
    from dinov2.eval.segmentation.train_loop import format_eta

    assert format_eta(seconds) == text
