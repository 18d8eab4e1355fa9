"""KoLeo regulariser on point sets whose nearest-neighbour distances are known by hand."""

import math

import pytest
import torch

from dinov2.loss import KoLeoLoss, koleo_per_crop


def on_circle(degrees):
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([torch.cos(rad), torch.sin(rad)], dim=1).float()


def test_square_on_circle():
    # Four points 90 degrees apart: every nearest neighbour is at chord length sqrt(2).
    loss = KoLeoLoss()(on_circle([0, 90, 180, 270]))
    assert loss.item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-5)


def test_asymmetric_configuration():
    # 0, 60 and 180 degrees: chords 1 (0-60), sqrt(3) (60-180), 2 (0-180).
    # Nearest distances are 1, 1 and sqrt(3) -> loss = -(0 + 0 + log sqrt 3) / 3.
    loss = KoLeoLoss()(on_circle([0, 60, 180]))
    assert loss.item() == pytest.approx(-math.log(3) / 6, abs=1e-5)


def test_inputs_are_normalised_first():
    points = on_circle([0, 60, 180])
    scaled = points * torch.tensor([[3.0], [0.5], [10.0]])
    assert torch.isclose(KoLeoLoss()(points), KoLeoLoss()(scaled), atol=1e-6)


def test_duplicates_give_finite_loss_and_gradient():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = KoLeoLoss()(x)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 5
    assert torch.isfinite(x.grad).all()


def test_gradient_pushes_nearest_neighbours_apart():
    x = on_circle([0, 10, 180]).requires_grad_(True)
    KoLeoLoss()(x).backward()
    with torch.no_grad():
        moved = torch.nn.functional.normalize(x - 0.01 * x.grad, dim=1)
    before = torch.dist(x[0], x[1]).item()
    after = torch.dist(moved[0], moved[1]).item()
    assert after > before


def test_per_crop_sums_views_separately():
    # Two views of the same 4 samples nearly coincide: pooled together every point has a
    # near-duplicate neighbour (huge loss); per view the points are well spread.
    view0 = on_circle([0, 90, 180, 270])
    view1 = on_circle([1, 91, 181, 271])
    both = torch.cat([view0, view1])
    per_view = koleo_per_crop(both, n_global=2)
    expected = KoLeoLoss()(view0) + KoLeoLoss()(view1)
    assert torch.isclose(per_view, expected)
    assert per_view.item() < KoLeoLoss()(both).item()


def test_errors():
    with pytest.raises(ValueError, match="B >= 2"):
        KoLeoLoss()(torch.randn(1, 4))
    with pytest.raises(ValueError, match="n_global=3"):
        koleo_per_crop(torch.randn(8, 4), n_global=3)
