"""iBOT loss: the student predicts the teacher's targets at the patch positions it saw masked.

Only global crops are masked. Every masked token is weighted by ``1 / (number of masked tokens
in its crop)``, so each crop contributes the MEAN cross-entropy of its masked tokens: a crop with
one masked token counts as much as a crop with ten (otherwise heavily masked crops would
dominate). The per-crop means are then averaged over all global crops of the batch, including
crops that happen to have no masked token (they add 0 but still count in the divisor, so the
loss scale does not depend on how many crops were masked).

The masked-token path (:meth:`iBOTPatchLoss.forward_masked`) is what training uses: the heads
run only on the masked tokens, gathered as ``tokens[masks]`` (row-major order over
``(crop, patch)``), which saves the 65536-way projection of every visible patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def masked_token_weights(masks: Tensor) -> Tensor:
    """Per-masked-token weights ``1 / (masked tokens in its crop)``.

    Args:
        masks: (n_crops, N) bool, True where the student's patch token was masked.

    Returns:
        (masks.sum(),) float32 weights, in the order of ``x[masks]`` for an (n_crops, N, ...) x.
    """
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(
            f"masked_token_weights: masks must be a (n_crops, N) bool tensor, got {masks.dtype} "
            f"{tuple(masks.shape)} (dinov2/loss/ibot_patch_loss.py)."
        )
    per_crop = 1.0 / masks.sum(dim=-1).clamp(min=1).float()  # (n_crops,)
    return per_crop.unsqueeze(-1).expand(masks.shape)[masks]


class iBOTPatchLoss(nn.Module):
    """Masked-patch cross-entropy between teacher targets and the student's tempered softmax.

    Args:
        patch_out_dim: number of patch prototypes K (checked against the inputs).
        student_temp: student softmax temperature (> 0), 0.1 by default.
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1) -> None:
        super().__init__()
        if patch_out_dim < 1:
            raise ValueError(
                f"iBOTPatchLoss: patch_out_dim must be >= 1, got {patch_out_dim} (dinov2/loss/ibot_patch_loss.py)."
            )
        if not student_temp > 0:
            raise ValueError(
                f"iBOTPatchLoss: student_temp must be > 0, got {student_temp} (dinov2/loss/ibot_patch_loss.py)."
            )
        self.patch_out_dim = patch_out_dim
        self.student_temp = student_temp

    def _token_cross_entropy(self, student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
        """(..., K) logits and targets -> (...) float32 cross-entropy per token."""
        log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        return -(teacher_probs.float() * log_probs).sum(dim=-1)

    def forward_masked(
        self,
        student_patch_logits_masked: Tensor,
        teacher_patch_probs_masked: Tensor,
        student_masks_flat: Tensor,
        n_masked_patches: int | Tensor | None = None,
        masks_weight: Tensor | None = None,
    ) -> Tensor:
        """Loss on the gathered masked tokens of all global crops.

        Args:
            student_patch_logits_masked: (M, K) student logits of the masked tokens, in the order
                of ``tokens[student_masks_flat]``; may be padded beyond ``n_masked_patches``.
            teacher_patch_probs_masked: (M, K) teacher targets for the same tokens.
            student_masks_flat: (n_global * B, N) bool masks of the student's global crops.
            n_masked_patches: number of real rows (the rest is padding); defaults to M.
            masks_weight: optional (>= n_masked_patches,) per-token weights; computed with
                :func:`masked_token_weights` from the masks when None.

        Returns:
            Scalar float32 loss ``sum_m w_m * CE_m / (n_global * B)``.
        """
        where = "iBOTPatchLoss.forward_masked"
        s, t, masks = student_patch_logits_masked, teacher_patch_probs_masked, student_masks_flat
        if s.ndim != 2 or s.shape != t.shape or s.shape[-1] != self.patch_out_dim:
            raise ValueError(
                f"{where}: student {tuple(s.shape)} and teacher {tuple(t.shape)} must both be "
                f"(M, {self.patch_out_dim}) (dinov2/loss/ibot_patch_loss.py)."
            )
        if masks.ndim != 2 or masks.dtype != torch.bool:
            raise ValueError(
                f"{where}: student_masks_flat must be (n_global * B, N) bool, got {masks.dtype} "
                f"{tuple(masks.shape)} (dinov2/loss/ibot_patch_loss.py)."
            )
        n = s.shape[0] if n_masked_patches is None else int(n_masked_patches)
        if not 0 <= n <= s.shape[0]:
            raise ValueError(
                f"{where}: n_masked_patches={n} exceeds the {s.shape[0]} logit rows (dinov2/loss/ibot_patch_loss.py)."
            )
        if masks_weight is None:
            n_in_masks = int(masks.sum())
            if n_in_masks != n:
                raise ValueError(
                    f"{where}: the masks hold {n_in_masks} masked tokens but {n} logit rows are used; "
                    "gather the logits as tokens[masks] and pass n_masked_patches for padded inputs "
                    "(dinov2/loss/ibot_patch_loss.py)."
                )
            masks_weight = masked_token_weights(masks)
        elif masks_weight.ndim != 1 or masks_weight.shape[0] < n:
            raise ValueError(
                f"{where}: masks_weight must be 1-D with at least {n} entries, got {tuple(masks_weight.shape)} "
                "(dinov2/loss/ibot_patch_loss.py)."
            )
        cross_entropy = self._token_cross_entropy(s[:n], t[:n])  # (n,)
        return (cross_entropy * masks_weight[:n].float()).sum() / masks.shape[0]

    def forward(self, student_patch_logits: Tensor, teacher_patch_probs: Tensor, masks: Tensor) -> Tensor:
        """Dense variant: same loss, from logits of ALL patch tokens.

        Args:
            student_patch_logits: (B, N, K) student logits of every patch of the global crops.
            teacher_patch_probs: (B, N, K) teacher targets.
            masks: (B, N) bool, True at the masked positions that enter the loss.

        Returns:
            Scalar float32 loss: mean over crops of the mean cross-entropy of the crop's masked
            tokens (crops without a masked token contribute 0). Equal to :meth:`forward_masked`
            on the gathered tokens.
        """
        where = "iBOTPatchLoss.forward"
        if (
            student_patch_logits.ndim != 3
            or student_patch_logits.shape != teacher_patch_probs.shape
            or student_patch_logits.shape[-1] != self.patch_out_dim
        ):
            raise ValueError(
                f"{where}: student {tuple(student_patch_logits.shape)} and teacher "
                f"{tuple(teacher_patch_probs.shape)} must both be (B, N, {self.patch_out_dim}) "
                "(dinov2/loss/ibot_patch_loss.py)."
            )
        if masks.dtype != torch.bool or tuple(masks.shape) != tuple(student_patch_logits.shape[:2]):
            raise ValueError(
                f"{where}: masks must be (B, N) = {tuple(student_patch_logits.shape[:2])} bool, got "
                f"{masks.dtype} {tuple(masks.shape)} (dinov2/loss/ibot_patch_loss.py)."
            )
        cross_entropy = self._token_cross_entropy(student_patch_logits, teacher_patch_probs)  # (B, N)
        per_crop = (cross_entropy * masks).sum(dim=-1) / masks.sum(dim=-1).clamp(min=1)
        return per_crop.mean()

    def extra_repr(self) -> str:
        return f"patch_out_dim={self.patch_out_dim}, student_temp={self.student_temp}"
