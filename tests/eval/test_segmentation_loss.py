"""The segmentation loss follows the preset: CE / Dice weights (``dataset.loss_weights``) and the
Dice variant (``dataset.dice_variant``), with and without an ignore label."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceLoss
from torch.nn import functional as F

from dinov2.eval.presets import DatasetPreset, load_preset
from dinov2.eval.segmentation.train_loop import build_loss


def preset(**changes) -> DatasetPreset:
    raw = dict(load_preset("brain_tissue"))
    raw.update({"datalist": "dataset.json"}, **changes)
    return DatasetPreset.from_config(raw)


def batch(classes: int = 4):
    torch.manual_seed(0)
    logits = torch.randn(2, classes, 6, 6, 6)
    label = torch.randint(0, classes, (2, 1, 6, 6, 6))
    return logits, label


def terms(logits, label, **dice_options):
    """(Dice, CE) of softmax classes, computed without the code under test."""
    onehot = F.one_hot(label[:, 0], logits.shape[1]).permute(0, 4, 1, 2, 3).float()
    dice = DiceLoss(**dice_options)(torch.softmax(logits, 1), onehot)
    return dice, F.cross_entropy(logits, label[:, 0])


@pytest.mark.parametrize("variant, options", [("dice", {}), ("squared", {"squared_pred": True}),
                                              ("jaccard", {"jaccard": True})])
def test_weights_and_variant_reach_the_loss(variant, options):
    logits, label = batch(len(preset().classes))
    weighted = preset(loss_weights={"dice": 0.6, "ce": 0.4}, dice_variant=variant)
    dice, ce = terms(logits, label, **options)
    assert torch.allclose(build_loss(weighted)(logits, label), 0.6 * dice + 0.4 * ce, atol=1e-5)
    assert torch.allclose(build_loss(preset())(logits, label), terms(logits, label)[0] + ce, atol=1e-5)


def test_the_ignore_label_loss_takes_the_same_weights():
    logits, label = batch(len(preset().classes))
    plain = build_loss(preset(ignore_label=9, loss_weights={"dice": 0.6, "ce": 0.4}))(logits, label)
    dice, ce = terms(logits, label)
    assert torch.allclose(plain, 0.6 * dice + 0.4 * ce, atol=1e-5)  # no voxel ignored: the plain weighted loss


@pytest.mark.parametrize("changes, words", [
    ({"loss_weights": {"dice": 0.0, "ce": 0.0}}, "dataset.loss_weights"),
    ({"loss_weights": {"dice": -1.0, "ce": 1.0}}, "dataset.loss_weights"),
    ({"dice_variant": "tversky"}, "dataset.dice_variant"),
])
def test_bad_loss_settings_name_the_key(changes, words):
    with pytest.raises(ValueError, match=words):
        preset(**changes)
