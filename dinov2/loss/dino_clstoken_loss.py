"""DINO loss on the CLS token: student crops predict the teacher's targets of OTHER views.

Crop pairing (``dino_pairs``): the student sees ``n_global`` global crops followed by the local
crops; the teacher sees the ``n_global`` global crops only. Student global crop ``i`` is matched
with every teacher crop ``j != i`` (predicting a view from itself is trivial); every local crop
is matched with every teacher crop. With the usual 2 global and 8 local crops that is
2 * 1 + 8 * 2 = 18 pairs.

With ``n_global = 1`` the single student global crop has no partner (its only teacher crop is
itself), so only the local crops contribute; with one global and no local crop there is no pair
at all and the loss refuses to run rather than return a meaningless zero.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def dino_pairs(n_global: int, n_student: int) -> list[tuple[int, int]]:
    """(student crop index, teacher crop index) pairs that enter the DINO loss.

    Args:
        n_global: number of global crops (= number of teacher crops), >= 1.
        n_student: number of student crops (global first, then local), >= n_global.

    Returns:
        Pairs in student-major order; may be empty (``n_global == n_student == 1``).

    Example:
        >>> dino_pairs(2, 3)
        [(0, 1), (1, 0), (2, 0), (2, 1)]
    """
    if n_global < 1:
        raise ValueError(f"dino_pairs: n_global must be >= 1, got {n_global} (dinov2/loss/dino_clstoken_loss.py).")
    if n_student < n_global:
        raise ValueError(
            f"dino_pairs: {n_student} student crops but {n_global} teacher (global) crops; the student "
            "list must hold the global crops first, then the local ones (dinov2/loss/dino_clstoken_loss.py)."
        )
    pairs = []
    for s in range(n_student):
        for t in range(n_global):
            if s < n_global and s == t:
                continue
            pairs.append((s, t))
    return pairs


class DINOLoss(nn.Module):
    """Cross-entropy between teacher targets and the student's tempered softmax, over crop pairs.

    Args:
        out_dim: number of prototypes K (checked against the inputs).
        student_temp: student softmax temperature (> 0), 0.1 by default.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"DINOLoss: out_dim must be >= 1, got {out_dim} (dinov2/loss/dino_clstoken_loss.py).")
        if not student_temp > 0:
            raise ValueError(
                f"DINOLoss: student_temp must be > 0, got {student_temp} (dinov2/loss/dino_clstoken_loss.py)."
            )
        self.out_dim = out_dim
        self.student_temp = student_temp

    def forward(self, student_logits_list: Sequence[Tensor], teacher_probs_list: Sequence[Tensor]) -> Tensor:
        """Mean over pairs of the batch-mean cross-entropy.

        Args:
            student_logits_list: per-crop (B, K) student logits: the ``n_global`` global crops
                first, then the local crops.
            teacher_probs_list: per-crop (B, K) teacher targets (rows sum to 1) of the
                ``n_global`` global crops, in the same order as the student's global crops.

        Returns:
            Scalar float32 loss: sum over :func:`dino_pairs` of
            ``mean_b(-sum_k t[b, k] * log_softmax(s[b] / student_temp)[k])``, divided by the
            number of pairs.
        """
        n_global, n_student = len(teacher_probs_list), len(student_logits_list)
        pairs = dino_pairs(n_global, n_student)
        if not pairs:
            raise ValueError(
                "DINOLoss: no (student, teacher) crop pair: with 1 global crop the student needs at "
                "least one local crop (dinov2/loss/dino_clstoken_loss.py); raise crops.local_crops_number."
            )
        shape = tuple(teacher_probs_list[0].shape)
        for name, crops in (("student", student_logits_list), ("teacher", teacher_probs_list)):
            for i, crop in enumerate(crops):
                if crop.ndim != 2 or tuple(crop.shape) != shape or crop.shape[-1] != self.out_dim:
                    raise ValueError(
                        f"DINOLoss: {name} crop {i} has shape {tuple(crop.shape)}; every crop must be "
                        f"(B, {self.out_dim}) with the same B as teacher crop 0 {shape} "
                        "(dinov2/loss/dino_clstoken_loss.py)."
                    )
        # float32: log_softmax over 65536 prototypes is too coarse in fp16/bf16.
        student_log_probs = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_logits_list]
        total = student_log_probs[0].new_zeros(())
        for s, t in pairs:
            total = total - (teacher_probs_list[t].float() * student_log_probs[s]).sum(dim=-1).mean()
        return total / len(pairs)

    def extra_repr(self) -> str:
        return f"out_dim={self.out_dim}, student_temp={self.student_temp}"
