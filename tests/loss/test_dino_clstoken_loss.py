"""DINO CLS loss: crop pairing and values against an explicit per-pair, per-sample loop."""

import math

import pytest
import torch

from dinov2.loss import DINOLoss, dino_pairs


def reference_loss(student, teacher, student_temp):
    """Independent scalar loop: pairs (s, t) with s != t for globals, all t for locals."""
    n_global = len(teacher)
    total, n_pairs = 0.0, 0
    for s_idx, s in enumerate(student):
        for t_idx, t in enumerate(teacher):
            if s_idx < n_global and s_idx == t_idx:
                continue
            batch_ce = 0.0
            for b in range(s.shape[0]):
                scaled = [float(v) / student_temp for v in s[b]]
                log_norm = math.log(sum(math.exp(v) for v in scaled))
                batch_ce += -sum(float(t[b, k]) * (scaled[k] - log_norm) for k in range(len(scaled)))
            total += batch_ce / s.shape[0]
            n_pairs += 1
    return total / n_pairs


def make_crops(n_global, n_local, batch=3, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(batch, k, generator=g) for _ in range(n_global + n_local)]
    teacher = [torch.softmax(torch.randn(batch, k, generator=g) / 0.5, dim=-1) for _ in range(n_global)]
    return student, teacher


def test_pairs_two_global_three_local():
    assert dino_pairs(2, 5) == [(0, 1), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (4, 0), (4, 1)]


def test_pairs_without_local_crops():
    assert dino_pairs(2, 2) == [(0, 1), (1, 0)]


def test_pairs_single_global_crop_has_no_self_pair():
    assert dino_pairs(1, 3) == [(1, 0), (2, 0)]
    assert dino_pairs(1, 1) == []


@pytest.mark.parametrize("n_global,n_local", [(2, 3), (2, 0), (1, 2), (3, 1)])
def test_loss_matches_reference_loop(n_global, n_local):
    student, teacher = make_crops(n_global, n_local)
    loss = DINOLoss(out_dim=5, student_temp=0.1)(student, teacher)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference_loss(student, teacher, 0.1), rel=1e-5)


def test_global_student_crop_ignores_its_own_teacher_crop():
    # With no local crop, student crop 0 only meets teacher crop 1: making student 0 agree
    # perfectly with teacher 0 must not change anything that teacher 0 pairs with.
    student, teacher = make_crops(2, 0)
    loss_fn = DINOLoss(out_dim=5)
    base = loss_fn(student, teacher)
    teacher_swapped = [teacher[1], teacher[0]]
    assert not torch.isclose(base, loss_fn(student, teacher_swapped))
    student_swapped = [student[1], student[0]]
    assert torch.isclose(base, loss_fn(student_swapped, teacher_swapped))


def test_single_global_without_local_refuses():
    student, teacher = make_crops(1, 0)
    with pytest.raises(ValueError, match="no \\(student, teacher\\) crop pair"):
        DINOLoss(out_dim=5)(student, teacher)


def test_shape_and_argument_errors():
    student, teacher = make_crops(2, 1)
    with pytest.raises(ValueError, match="student crop 2"):
        DINOLoss(out_dim=5)(student[:2] + [torch.randn(4, 5)], teacher)
    with pytest.raises(ValueError, match="out_dim"):
        DINOLoss(out_dim=0)
    with pytest.raises(ValueError, match="student_temp"):
        DINOLoss(out_dim=5, student_temp=0.0)
    with pytest.raises(ValueError, match="global crops first"):
        dino_pairs(3, 2)


def test_gradient_reaches_student_and_bf16_inputs_work():
    student, teacher = make_crops(2, 2)
    student = [s.clone().requires_grad_(True) for s in student]
    loss = DINOLoss(out_dim=5)(student, teacher)
    loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    low = DINOLoss(out_dim=5)([s.detach().bfloat16() for s in student], [t.bfloat16() for t in teacher])
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(loss.item(), rel=2e-2)
