"""Linear probe: multinomial logistic regression, full-batch L-BFGS in torch, deterministic.

Recipe (the usual one for frozen-feature evidence, without scikit-learn):

* features standardised with the mean and standard deviation of the examples it is fitted on;
* cross-entropy weighted by the inverse class frequency of those examples, so every class
  weighs the same (the reported metric is balanced accuracy);
* L2 penalty ``l2 / 2 * ||W||^2`` on the weights (not the bias), strength chosen from
  :data:`L2_GRID` by grouped K-fold cross-validation on the training examples
  (:func:`cross_validate`; the folds are spatial blocks or z slabs, :mod:`.folds`): while a fold
  is held out the probe is fitted on the other folds (with ``--cv-buffer``, less the examples
  whose inputs share voxels with it); the CV score is the mean balanced accuracy over the
  held-out folds, ties go to the stronger penalty;
* the chosen strength is then refitted on all training examples (:func:`fit_probe`);
* float64 full-batch L-BFGS with a strong-Wolfe line search: the problem is strictly convex, so
  the solution does not depend on any random state. The final fit starts from zero weights;
  within a fold the penalties are fitted strongest first, each from the previous solution
  (close to the next one), with at most :data:`CV_MAX_ITERATIONS` steps, to keep CV cheap.

The test examples are never seen by either step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
MAX_ITERATIONS = 300
CV_MAX_ITERATIONS = 100


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
                            weights: torch.Tensor, start: tuple[torch.Tensor, torch.Tensor] | None = None,
                            max_iterations: int = MAX_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise the class-weighted cross-entropy plus ``l2 / 2 * ||W||^2`` by L-BFGS.

    Args:
        x: float64 ``(N, D)`` standardised features.
        labels: ``(N,)`` class indices.
        num_classes: ``K``.
        l2: penalty strength.
        weights: ``(K,)`` class weights (see :func:`class_weights`).
        start: ``(weight (D, K), bias (K,))`` to start from (default zeros).
        max_iterations: L-BFGS iterations at most.

    Returns:
        ``(weight (D, K), bias (K,))``, float64, detached.
    """
    if start is None:
        start = (x.new_zeros(x.shape[1], num_classes), x.new_zeros(num_classes))
    weight, bias = (t.detach().clone().requires_grad_(True) for t in start)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iterations, history_size=20,
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


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float,
              start: LinearProbe | None = None, max_iterations: int = MAX_ITERATIONS) -> LinearProbe:
    """Standardise, weigh the classes and fit one probe on every example given.

    Args:
        features: ``(N, D)`` features; labels: ``(N,)`` class indices.
        num_classes: ``K``.
        l2: penalty strength.
        start: a probe fitted on the same examples (same standardisation) to start from.
        max_iterations: L-BFGS iterations at most.

    Returns:
        The fitted :class:`LinearProbe`.
    """
    x = features.double()
    mean, std = _standardisation(x)
    init = None if start is None else (start.weight, start.bias)
    weight, bias = fit_logistic_regression((x - mean) / std, labels, num_classes, l2,
                                           class_weights(labels, num_classes), init, max_iterations)
    return LinearProbe(mean, std, weight, bias, float(l2))


def fold_scores(features: torch.Tensor, labels: torch.Tensor, held_out: torch.Tensor, num_classes: int,
                l2_grid: tuple[float, ...] = L2_GRID, fitted_on: torch.Tensor | None = None) -> dict[float, float]:
    """Balanced accuracy on one held-out fold of probes fitted on the other folds, per penalty.

    Args:
        features: ``(N, D)`` training features; labels: ``(N,)``.
        held_out: int64 indices of the fold left out.
        num_classes: ``K``.
        l2_grid: penalties tried.
        fitted_on: int64 indices of the examples the probes are fitted on (disjoint from
            ``held_out``; default: every example not held out).

    Returns:
        ``{l2: balanced accuracy on the held-out fold}``.
    """
    if fitted_on is None:
        keep = torch.ones(labels.numel(), dtype=torch.bool)
        keep[held_out] = False
    else:
        keep = torch.zeros(labels.numel(), dtype=torch.bool)
        keep[fitted_on] = True
    scores, probe = {}, None
    for l2 in sorted(l2_grid, reverse=True):  # strongest first: each solution starts the next, weaker fit
        probe = fit_probe(features[keep], labels[keep], num_classes, l2, probe, CV_MAX_ITERATIONS)
        scores[float(l2)] = balanced_accuracy(probe.predict(features[held_out]), labels[held_out])
    return scores


def choose_l2(cv_by_l2: dict[float, float]) -> float:
    """The penalty of the highest CV score; ties: the stronger penalty (the simpler probe)."""
    return max(cv_by_l2, key=lambda l2: (cv_by_l2[l2], l2))


def cross_validate(features: torch.Tensor, labels: torch.Tensor, folds: list[torch.Tensor], num_classes: int,
                   l2_grid: tuple[float, ...] = L2_GRID, fitted_on: list[torch.Tensor] | None = None) -> dict:
    """Choose the penalty by K-fold cross-validation over the given folds.

    Args:
        features: ``(N, D)`` training features; labels: ``(N,)``.
        folds: int64 index tensors into the ``N`` examples, disjoint (see :mod:`.folds`).
        num_classes: ``K``.
        l2_grid: penalties tried.
        fitted_on: per fold, int64 indices of the examples fitted while it is held out (the
            other folds less the buffer, see :func:`~.folds.buffered_training`); empty or None:
            all the other folds.

    Returns:
        ``{"l2": chosen, "cv_balanced_accuracy": its CV score, "cv_by_l2": {str(l2): mean over
        folds}, "cv_by_l2_per_fold": {str(l2): [score of fold f]}}``.

    Raises:
        ValueError: no fold given (a task built without :func:`~.folds.attach_folds`), or
            ``fitted_on`` not one per fold.
    """
    if not folds:
        raise ValueError("cross_validate needs at least one fold: build the task with its folds attached.")
    if fitted_on and len(fitted_on) != len(folds):
        raise ValueError(f"cross_validate got {len(fitted_on)} training sets for {len(folds)} folds.")
    per_fold = [fold_scores(features, labels, held_out, num_classes, l2_grid, fitted_on[f] if fitted_on else None)
                for f, held_out in enumerate(folds)]
    means = {l2: sum(f[l2] for f in per_fold) / len(per_fold) for l2 in per_fold[0]}
    l2 = choose_l2(means)
    return {"l2": l2, "cv_balanced_accuracy": means[l2],
            "cv_by_l2": {f"{k:g}": v for k, v in sorted(means.items())},
            "cv_by_l2_per_fold": {f"{k:g}": [f[k] for f in per_fold] for k in sorted(means)}}
