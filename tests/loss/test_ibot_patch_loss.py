"""iBOT masked-patch loss: per-crop weighting, padding, dense/masked agreement."""

import math

import pytest
import torch

from dinov2.loss import iBOTPatchLoss, masked_token_weights


def reference_loss(student_dense, teacher_dense, masks, student_temp):
    """Explicit loops: per crop, mean CE over its masked tokens; then mean over all crops."""
    n_crops, n_tokens, k = student_dense.shape
    crop_means = []
    for c in range(n_crops):
        token_ces = []
        for n in range(n_tokens):
            if not masks[c, n]:
                continue
            scaled = [float(v) / student_temp for v in student_dense[c, n]]
            log_norm = math.log(sum(math.exp(v) for v in scaled))
            token_ces.append(-sum(float(teacher_dense[c, n, j]) * (scaled[j] - log_norm) for j in range(k)))
        crop_means.append(sum(token_ces) / len(token_ces) if token_ces else 0.0)
    return sum(crop_means) / n_crops


def make_case(seed=0, n_crops=4, n_tokens=12, k=6):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n_crops, n_tokens, k, generator=g)
    teacher = torch.softmax(torch.randn(n_crops, n_tokens, k, generator=g) / 0.3, dim=-1)
    masks = torch.zeros(n_crops, n_tokens, dtype=torch.bool)
    masks[0, [1]] = True  # 1 masked token
    masks[1, :10] = True  # 10 masked tokens
    masks[2, [0, 5, 11]] = True
    # crop 3: nothing masked, still counts in the average
    return student, teacher, masks


def test_masked_loss_matches_reference_loop():
    student, teacher, masks = make_case()
    loss = iBOTPatchLoss(patch_out_dim=6).forward_masked(student[masks], teacher[masks], masks)
    assert loss.item() == pytest.approx(reference_loss(student, teacher, masks, 0.1), rel=1e-5)


def test_crop_with_one_token_counts_as_much_as_crop_with_ten():
    k = 4
    masks = torch.zeros(2, 10, dtype=torch.bool)
    masks[0, 3] = True
    masks[1, :] = True
    teacher = torch.zeros(2, 10, k)
    teacher[..., 0] = 1.0  # one-hot targets on prototype 0
    student = torch.zeros(2, 10, k)  # uniform student: CE = log(k) ...
    student[0, 3, 0] = 1.0  # ... except crop 0's token, which leans towards the target
    ce_one = -(0.1**-1 - math.log(math.exp(0.1**-1) + (k - 1)))
    ce_ten = math.log(k)
    loss = iBOTPatchLoss(patch_out_dim=k).forward_masked(student[masks], teacher[masks], masks)
    assert loss.item() == pytest.approx((ce_one + ce_ten) / 2, rel=1e-5)
    token_weighted = (ce_one + 10 * ce_ten) / 11
    assert loss.item() != pytest.approx(token_weighted, rel=1e-3)


def test_weights_follow_mask_order():
    masks = torch.tensor([[True, False, True, True], [False, True, False, False]])
    weights = masked_token_weights(masks)
    assert torch.allclose(weights, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))


def test_padding_rows_are_ignored():
    student, teacher, masks = make_case(seed=1)
    n = int(masks.sum())
    loss_fn = iBOTPatchLoss(patch_out_dim=6)
    exact = loss_fn.forward_masked(student[masks], teacher[masks], masks)
    padded_s = torch.cat([student[masks], 50 * torch.randn(5, 6)])
    padded_t = torch.cat([teacher[masks], torch.softmax(torch.randn(5, 6), dim=-1)])
    padded = loss_fn.forward_masked(padded_s, padded_t, masks, n_masked_patches=n)
    assert torch.isclose(exact, padded)
    given = loss_fn.forward_masked(
        padded_s, padded_t, masks, n_masked_patches=torch.tensor(n), masks_weight=masked_token_weights(masks)
    )
    assert torch.isclose(exact, given)


def test_dense_variant_equals_masked_variant():
    student, teacher, masks = make_case(seed=2)
    loss_fn = iBOTPatchLoss(patch_out_dim=6, student_temp=0.2)
    dense = loss_fn(student, teacher, masks)
    gathered = loss_fn.forward_masked(student[masks], teacher[masks], masks)
    assert torch.isclose(dense, gathered)
    assert dense.item() == pytest.approx(reference_loss(student, teacher, masks, 0.2), rel=1e-5)


def test_errors():
    student, teacher, masks = make_case()
    loss_fn = iBOTPatchLoss(patch_out_dim=6)
    with pytest.raises(ValueError, match="masked tokens"):
        loss_fn.forward_masked(student[masks][:-1], teacher[masks][:-1], masks)
    with pytest.raises(ValueError, match="bool"):
        loss_fn.forward_masked(student[masks], teacher[masks], masks.float())
    with pytest.raises(ValueError, match=r"\(M, 6\)"):
        loss_fn.forward_masked(student[masks][:, :5], teacher[masks][:, :5], masks)
    with pytest.raises(ValueError, match="patch_out_dim"):
        iBOTPatchLoss(patch_out_dim=0)
