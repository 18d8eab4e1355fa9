"""Principal components of patch tokens: fit on foreground tokens, project, scale for display."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PCAFit:
    """A fitted PCA.

    Attributes:
        mean: ``(E,)`` mean of the fitted tokens.
        components: ``(k, E)`` orthonormal principal axes, strongest first. Each axis' sign is
            fixed so its largest-magnitude loading is positive (SVD signs are arbitrary).
        explained_variance: ``(k,)`` variance of the fitted tokens along each axis.
        explained_variance_ratio: ``(k,)`` share of the total variance.
        n_tokens: tokens the fit used.
    """

    mean: torch.Tensor
    components: torch.Tensor
    explained_variance: torch.Tensor
    explained_variance_ratio: torch.Tensor
    n_tokens: int

    def transform(self, tokens: torch.Tensor) -> torch.Tensor:
        """Scores ``(N, k)`` of tokens ``(N, E)`` on the principal axes."""
        return (tokens.float() - self.mean) @ self.components.T


def fit_pca(tokens: torch.Tensor, n_components: int) -> PCAFit:
    """PCA by singular value decomposition of the centred tokens (float64 for stable axes).

    Args:
        tokens: ``(N, E)`` feature vectors (e.g. foreground patch tokens of one or more volumes).
        n_components: ``k``; must not exceed ``min(N - 1, E)``.

    Returns:
        :class:`PCAFit`.
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (N, E), got {tuple(tokens.shape)}")
    n, dim = tokens.shape
    if n_components < 1 or n_components > min(n - 1, dim):
        raise ValueError(f"n_components must be in [1, min(N - 1, E)] = [1, {min(n - 1, dim)}] for {n} tokens of "
                         f"width {dim}, got {n_components}. Lower --n-components or give a larger input.")
    x = tokens.double()
    mean = x.mean(dim=0)
    _, singular, vh = torch.linalg.svd(x - mean, full_matrices=False)
    axes = vh[:n_components]
    strongest = axes.abs().argmax(dim=1)
    signs = torch.sign(axes.gather(1, strongest[:, None]))
    axes = axes * signs
    variance = singular**2 / max(n - 1, 1)
    total = variance.sum().clamp_min(1e-30)
    return PCAFit(mean.float(), axes.float(), variance[:n_components].float(),
                  (variance[:n_components] / total).float(), n)


def scale_scores(scores: torch.Tensor, reference: torch.Tensor, low: float = 1.0, high: float = 99.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map each component to ``[0, 1]`` by its ``low``-``high`` percentile range on reference tokens.

    Args:
        scores: ``(N, k)`` PCA scores.
        reference: bool ``(N,)``: tokens whose range defines the scaling (the foreground).
        low, high: percentiles (robust to a few extreme tokens).

    Returns:
        ``(scaled (N, k) clipped to [0, 1], lows (k,), highs (k,))``.
    """
    if not 0 <= low < high <= 100:
        raise ValueError(f"Need 0 <= low < high <= 100, got {low}, {high}")
    ref = scores[reference.bool()]
    if ref.shape[0] == 0:
        raise ValueError("No reference token to scale the components on (empty foreground).")
    lows = torch.quantile(ref.float(), low / 100.0, dim=0)
    highs = torch.quantile(ref.float(), high / 100.0, dim=0)
    span = (highs - lows).clamp_min(1e-12)
    return ((scores - lows) / span).clamp(0.0, 1.0), lows, highs
