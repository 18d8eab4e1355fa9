"""Linear probe: multinomial logistic regression, full-batch L-BFGS in torch, deterministic.

Recipe (the usual one for frozen-feature evidence, without scikit-learn):

* features standardised with the training split's mean and standard deviation;
* cross-entropy weighted by the inverse class frequency of the training split, so every class
  weighs the same (the reported metric is balanced accuracy);
* L2 penalty ``l2 / 2 * ||W||^2`` on the weights (not the bias), strength chosen from
  :data:`L2_GRID` by validation balanced accuracy (ties: the stronger penalty);
* float64 full-batch L-BFGS with a strong-Wolfe line search from zero weights: the problem is
  strictly convex, so the solution does not depend on any random state.

The probe is fitted on the training split only; the validation split only chooses ``l2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
MAX_ITERATIONS = 300


@dataclass
class LinearProbe:
    """A fitted probe.

    Attributes:
        mean, std: ``(D,)`` standardisation of the training features.
        weight: ``(D, K)`` and ``bias``: ``(K,)``, float64.
        l2: the penalty it was fitted with.
    """

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    l2: float

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` features -> ``(N,)`` predicted class indices."""
        x = (features.double() - self.mean) / self.std
        return (x @ self.weight + self.bias).argmax(dim=1)


def balanced_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean per-class recall over the classes present in ``labels``.

    Args:
        predictions: ``(N,)`` predicted class indices.
        labels: ``(N,)`` true class indices.

    Returns:
        A float in ``[0, 1]``; chance is ``1 / (number of classes present)``.
    """
    recalls = [(predictions[labels == c] == c).double().mean() for c in labels.unique()]
    return float(torch.stack(recalls).mean())


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(K,)`` float64 weights ``N / (K_present * n_c)``; 0 for a class absent from ``labels``."""
    counts = torch.bincount(labels, minlength=num_classes).double()
    present = int((counts > 0).sum())
    return torch.where(counts > 0, labels.numel() / (present * counts.clamp_min(1)), torch.zeros_like(counts))


def fit_logistic_regression(x: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float,
                            weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise the class-weighted cross-entropy plus ``l2 / 2 * ||W||^2`` by L-BFGS.

    Args:
        x: float64 ``(N, D)`` standardised features.
        labels: ``(N,)`` class indices.
        num_classes: ``K``.
        l2: penalty strength.
        weights: ``(K,)`` class weights (see :func:`class_weights`).

    Returns:
        ``(weight (D, K), bias (K,))``, float64, detached.
    """
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=MAX_ITERATIONS, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, labels, weight=weights) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def _standardisation(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = features.mean(dim=0)
    std = features.std(dim=0, unbiased=False)
    # A constant feature (e.g. air) carries nothing; dividing by ~0 would only blow up noise.
    return mean, torch.where(std > 1e-8, std, torch.ones_like(std))


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
              num_classes: int, l2_grid: tuple[float, ...] = L2_GRID) -> tuple[LinearProbe, float]:
    """Fit one probe per ``l2`` on the training split, keep the best on validation.

    Args:
        train_x: ``(N, D)`` training features; train_y: ``(N,)`` labels.
        val_x: ``(M, D)`` validation features; val_y: ``(M,)`` labels.
        num_classes: ``K``.
        l2_grid: penalties tried.

    Returns:
        ``(probe, its validation balanced accuracy)``.
    """
    train_x, val_x = train_x.double(), val_x.double()
    mean, std = _standardisation(train_x)
    x = (train_x - mean) / std
    weights = class_weights(train_y, num_classes)
    best: tuple[LinearProbe, float] | None = None
    for l2 in sorted(l2_grid, reverse=True):  # strongest first: a tie keeps the simpler probe
        weight, bias = fit_logistic_regression(x, train_y, num_classes, l2, weights)
        probe = LinearProbe(mean, std, weight, bias, float(l2))
        score = balanced_accuracy(probe.predict(val_x), val_y)
        if best is None or score > best[1]:
            best = (probe, score)
    return best
