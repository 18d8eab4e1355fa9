"""KoLeo regulariser: spread the student's CLS embeddings uniformly over the sphere.

It is the Kozachenko-Leonenko differential-entropy estimator up to constants: minus the mean log
distance from each L2-normalised sample to its nearest neighbour in the batch. Minimising it
pushes close samples apart. The trainer applies it to the student's CLS tokens (backbone output,
before the heads) of each global-crop view SEPARATELY -- two views of the same volume are meant
to be close, so they must not repel each other -- and weights the sum by ``dino.koleo_loss_weight``
(0.1); see :func:`koleo_per_crop`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KoLeoLoss(nn.Module):
    """``-mean_i log(||x_i - x_nn(i)|| + eps)`` on L2-normalised rows.

    Args:
        eps: added inside the log and to the pairwise difference, so coincident samples give a
            large but finite loss and gradient.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"KoLeoLoss: eps must be > 0, got {eps} (dinov2/loss/koleo_loss.py).")
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """KoLeo loss of one set of embeddings.

        Args:
            x: (B, D) embeddings, B >= 2 (a nearest OTHER sample must exist); normalised here.

        Returns:
            Scalar float32 loss.
        """
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(
                f"KoLeoLoss: expected (B, D) embeddings with B >= 2, got {tuple(x.shape)}; with one sample "
                "per process there is no neighbour, use a larger batch_size_per_gpu or set "
                "dino.koleo_loss_weight=0 (dinov2/loss/koleo_loss.py)."
            )
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.normalize(x.float(), p=2, dim=-1, eps=self.eps)
            with torch.no_grad():
                # On the unit sphere the nearest neighbour is the largest dot product; the index
                # search needs no gradient, the distance below carries it.
                similarity = x @ x.t()
                similarity.fill_diagonal_(-float("inf"))
                nearest = similarity.argmax(dim=1)
            distances = F.pairwise_distance(x, x[nearest], p=2, eps=self.eps)
            return -torch.log(distances + self.eps).mean()

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def koleo_per_crop(student_cls_global: Tensor, n_global: int, koleo_loss: KoLeoLoss | None = None) -> Tensor:
    """Sum of KoLeo losses over the global-crop views, each view on its own.

    The meta-architecture concatenates the student's global-crop CLS tokens view by view
    (view 0 of every sample, then view 1, ...); this helper chunks that tensor back into the
    ``n_global`` views and sums their KoLeo losses. Multiply the result by
    ``dino.koleo_loss_weight`` (0.1) before adding it to the total loss.

    Args:
        student_cls_global: (n_global * B, D) student CLS tokens of the global crops, view-major.
        n_global: number of global crops (views), >= 1.
        koleo_loss: the loss module to use; a default :class:`KoLeoLoss` when None.

    Returns:
        Scalar float32 loss, the SUM over views (not the mean).
    """
    if n_global < 1 or student_cls_global.ndim != 2 or student_cls_global.shape[0] % n_global:
        raise ValueError(
            f"koleo_per_crop: cannot split {tuple(student_cls_global.shape)} into n_global={n_global} "
            "equal (B, D) views (dinov2/loss/koleo_loss.py); pass the view-major global CLS tokens."
        )
    koleo_loss = koleo_loss if koleo_loss is not None else KoLeoLoss()
    return sum(koleo_loss(view) for view in student_cls_global.chunk(n_global, dim=0))
