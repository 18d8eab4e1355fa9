"""The ignore label (``dataset.ignore_label``, nnU-Net's ``ignore``): unannotated voxels that count nowhere.

Preprocessing (:mod:`.data`) turns the ignore value into :data:`IGNORED` (-1): in a class map
``(B, 1, ...)`` the voxel holds -1; in region channels ``(B, K, ...)`` every channel does. A
negative value survives nearest-neighbour resampling and marks the voxels that the training
crops' centres (:class:`AnnotatedCropCentresd`), the loss (:class:`IgnoreMaskedLoss`) and the
metrics (:func:`mask_ignored`) leave out.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.transforms import MapTransform
from monai.networks.utils import one_hot
from torch import nn

IGNORED = -1
CROP_CENTRE_KEYS = {"fg_indices_key": "fg_indices", "bg_indices_key": "bg_indices"}


class AnnotatedCropCentresd(MapTransform):
    """Voxel indices for ``RandCropByPosNegLabeld`` (its ``fg_indices_key`` / ``bg_indices_key``,
    :data:`CROP_CENTRE_KEYS`) that leave ignored voxels out.

    MONAI's own rule takes every non-zero label voxel as foreground, so -1 would attract the
    foreground crops. Here foreground is ``label > 0`` and background ``label == 0`` where an image
    channel is above 0 (MONAI's ``image_threshold=0`` rule), as indices into the flattened
    ``(H, W, D)`` grid of ``label`` ``(1, H, W, D)`` and ``image`` ``(C, H, W, D)``.
    """

    def __init__(self, label_key: str = "label", image_key: str = "image"):
        super().__init__([label_key])
        self.label_key, self.image_key = label_key, image_key

    def __call__(self, data):
        d = dict(data)
        label = np.asarray(d[self.label_key])[0]
        in_image = (np.asarray(d[self.image_key]) > 0).any(0)
        d[CROP_CENTRE_KEYS["fg_indices_key"]] = np.flatnonzero(label > 0)
        d[CROP_CENTRE_KEYS["bg_indices_key"]] = np.flatnonzero((label == 0) & in_image)
        return d


def valid_mask(label: torch.Tensor) -> torch.Tensor:
    """``(B, 1, *S)`` float mask, 1 where a voxel is annotated, of a label ``(B, 1 or K, *S)``."""
    return (label >= 0).all(dim=1, keepdim=True).float()


class IgnoreMaskedLoss(nn.Module):
    """The presets' losses with ignored voxels left out: Dice + cross-entropy (softmax classes) or
    Dice (sigmoid regions), as MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)`` /
    ``DiceLoss(sigmoid=True)`` compute them, over annotated voxels only.

    Dice sums of ignored voxels are zeroed on both prediction and target, so they add nothing to
    the intersection or the sizes; the cross-entropy is the mean over annotated voxels. Without an
    ignored voxel the value equals MONAI's loss.

    Args:
        multilabel: regions (sigmoid, Dice) instead of classes (softmax, Dice + CE).
        dice_weight, ce_weight: the preset's ``loss_weights``.
        squared_pred, jaccard: the preset's Dice variant (MONAI ``DiceLoss`` options).
    """

    def __init__(self, multilabel: bool, dice_weight: float = 1.0, ce_weight: float = 1.0,
                 squared_pred: bool = False, jaccard: bool = False):
        super().__init__()
        self.multilabel = multilabel
        self.dice_weight, self.ce_weight = float(dice_weight), float(ce_weight)
        self.dice = DiceLoss(squared_pred=squared_pred, jaccard=jaccard)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` ``(B, K, *S)`` against ``label`` ``(B, 1, *S)`` classes or ``(B, K, *S)``
        regions, -1 where ignored."""
        valid = valid_mask(label)
        target = label.clamp(min=0)
        if self.multilabel:
            return self.dice_weight * self.dice(torch.sigmoid(logits) * valid, target * valid)
        onehot = one_hot(target.long(), num_classes=logits.shape[1], dim=1)
        dice = self.dice(torch.softmax(logits, 1) * valid, onehot * valid)
        ce = F.cross_entropy(logits, target[:, 0].long(), reduction="none") * valid[:, 0]
        return self.dice_weight * dice + self.ce_weight * ce.sum() / valid.sum().clamp(min=1)


def mask_ignored(pred: torch.Tensor, target: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks ``(1, K, *S)`` with ignored voxels (-1 in ``label`` ``(1, 1 or K, *S)``) set to 0 in both,
    so they are no TP, FP or FN of any channel."""
    valid = valid_mask(label).to(pred.device)
    return pred * valid, target * valid.to(target.device)
