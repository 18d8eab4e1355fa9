"""Teacher targets: turn teacher logits into probabilities that cannot collapse.

Two ways, chosen by the config key ``centering`` (see :func:`build_centering`):

* ``sinkhorn_knopp``: a few Sinkhorn-Knopp iterations make the (samples x prototypes) matrix
  doubly normalised: every sample's row sums to 1 and every prototype receives the same total
  mass, so no prototype can take over the batch (the collapse DINO fights).
* ``softmax``: subtract an exponential moving average of the teacher logits (the "center"),
  then a sharp softmax.

Both are statistics of the WHOLE batch, so under ``torchrun`` every sum over samples is
all-reduced across ranks: the targets do not depend on how the batch was split. Both compute in
float32 even under autocast, because a temperature of 0.04 turns small fp16 rounding errors
into large changes of ``exp``.

The two share one interface so the meta-architecture does not branch::

    centering = build_centering(cfg.centering, out_dim)
    probs = centering(teacher_logits, teacher_temp)     # (R, K) float32 targets
    centering.update(teacher_logits)                    # EMA step; no-op for Sinkhorn-Knopp

For iBOT the teacher's masked-patch logits are often padded to a fixed number of rows (so all
ranks run the same shapes); ``n_valid_rows`` says how many leading rows are real. Padded rows
are excluded from every statistic and get all-zero targets.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dinov2 import distributed

CENTERING_KINDS = ("sinkhorn_knopp", "softmax")


def _needs_all_reduce() -> bool:
    return distributed.is_enabled() and distributed.get_world_size() > 1


def _all_reduce_(tensor: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """All-reduce in place when a multi-process group exists; identity for one process."""
    if _needs_all_reduce():
        dist.all_reduce(tensor, op=op)
    return tensor


def _valid_rows(teacher_logits: Tensor, n_valid_rows: int | Tensor | None, where: str) -> int:
    """Check a (R, K) logits matrix and return how many leading rows are real."""
    if teacher_logits.ndim != 2:
        raise ValueError(
            f"{where}: teacher logits must be (rows, prototypes), got shape {tuple(teacher_logits.shape)} "
            "(dinov2/loss/centering.py). Flatten crops/tokens into rows first."
        )
    n_rows = teacher_logits.shape[0]
    if n_valid_rows is None:
        return n_rows
    n_valid = int(n_valid_rows)
    if not 0 <= n_valid <= n_rows:
        raise ValueError(
            f"{where}: n_valid_rows={n_valid} must lie in [0, {n_rows}] (the number of logit rows) "
            "(dinov2/loss/centering.py)."
        )
    return n_valid


def _pad_rows(probs: Tensor, n_rows: int) -> Tensor:
    """Append all-zero rows so padded positions get no target mass."""
    if probs.shape[0] == n_rows:
        return probs
    pad = probs.new_zeros(n_rows - probs.shape[0], probs.shape[1])
    return torch.cat([probs, pad], dim=0)


def _check_temperature(teacher_temp: float, where: str) -> None:
    if not teacher_temp > 0:
        raise ValueError(
            f"{where}: teacher_temp must be > 0, got {teacher_temp} (dinov2/loss/centering.py); "
            "check teacher.teacher_temp / teacher.warmup_teacher_temp in the config."
        )


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    n_valid_rows: int | Tensor | None = None,
) -> Tensor:
    """Sinkhorn-Knopp teacher targets, all-reduced across ranks when a process group exists.

    Starting from ``exp(logits / teacher_temp)``, alternately rescales every prototype column
    to the same total mass (1/K of the global batch) and every sample row to sum to 1. The
    iteration runs in the log domain (log-sum-exp instead of sums of ``exp``), which gives the
    same numbers as the textbook version but cannot underflow to 0/0 for sharp temperatures or
    large logits.

    Args:
        teacher_logits: (R, K) teacher head outputs for this rank's rows (CLS tokens of the
            teacher crops, or masked patch tokens); any float dtype.
        teacher_temp: softmax temperature (> 0), e.g. 0.04 -> 0.07 during warm-up.
        n_iterations: number of (column, row) normalisation rounds (>= 1); 3 is the usual.
        n_valid_rows: if given, only the first ``n_valid_rows`` rows are real samples (the rest
            is padding); the global batch size is the all-reduced sum of this count.

    Returns:
        (R, K) float32 targets: each valid row sums to 1; over the whole global batch each
        prototype column sums to about B_global / K (exactly so after the last column step,
        approximately after the final row step). Padded rows are all zeros.

    Example:
        >>> probs = sinkhorn_knopp(torch.randn(8, 16), teacher_temp=0.07)
        >>> probs.shape, bool(torch.allclose(probs.sum(1), torch.ones(8)))
        (torch.Size([8, 16]), True)
    """
    where = "sinkhorn_knopp"
    _check_temperature(teacher_temp, where)
    if n_iterations < 1:
        raise ValueError(f"{where}: n_iterations must be >= 1, got {n_iterations} (dinov2/loss/centering.py).")
    n_valid = _valid_rows(teacher_logits, n_valid_rows, where)
    n_rows, n_prototypes = teacher_logits.shape
    with torch.autocast(device_type=teacher_logits.device.type, enabled=False):
        log_q = teacher_logits[:n_valid].float() / teacher_temp  # (B, K)
        global_batch = _all_reduce_(torch.tensor(float(n_valid), device=log_q.device))
        if global_batch.item() == 0:
            raise ValueError(
                f"{where}: no valid rows on any rank (n_valid_rows summed to 0); there is nothing to "
                "normalise. Skip the iBOT term when no patch is masked (dinov2/loss/centering.py)."
            )
        log_batch = math.log(global_batch.item())
        log_prototypes = math.log(n_prototypes)
        for _ in range(n_iterations):
            # Column step: log of each prototype's mass over the GLOBAL batch (stable log-sum-exp
            # across ranks: reduce the max first, then the sum of shifted exponentials).
            col_max = log_q.max(dim=0, keepdim=True).values if n_valid else log_q.new_full((1, n_prototypes), -math.inf)
            _all_reduce_(col_max, op=dist.ReduceOp.MAX)
            col_sum = torch.exp(log_q - col_max).sum(dim=0, keepdim=True)
            _all_reduce_(col_sum)
            log_q = log_q - (col_max + torch.log(col_sum)) - log_prototypes
            # Row step: purely per sample, no communication needed.
            log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_batch
        probs = torch.exp(log_q + log_batch)
    return _pad_rows(probs, n_rows)


class SinkhornKnopp(nn.Module):
    """Sinkhorn-Knopp targets behind the common centering interface (no state, no update).

    Args:
        n_iterations: normalisation rounds per call (>= 1).
    """

    def __init__(self, n_iterations: int = 3) -> None:
        super().__init__()
        if n_iterations < 1:
            raise ValueError(
                f"SinkhornKnopp: n_iterations must be >= 1, got {n_iterations} (dinov2/loss/centering.py)."
            )
        self.n_iterations = n_iterations

    def forward(self, teacher_logits: Tensor, teacher_temp: float, n_valid_rows: int | Tensor | None = None) -> Tensor:
        """(R, K) logits -> (R, K) float32 targets; see :func:`sinkhorn_knopp`."""
        return sinkhorn_knopp(teacher_logits, teacher_temp, self.n_iterations, n_valid_rows)

    def update(self, teacher_logits: Tensor, n_valid_rows: int | Tensor | None = None) -> None:
        """No-op: Sinkhorn-Knopp keeps no running statistics (kept for the common interface)."""

    def extra_repr(self) -> str:
        return f"n_iterations={self.n_iterations}"


class EMACentering(nn.Module):
    """Softmax of teacher logits minus an EMA "center" of past teacher logits.

    The center is a registered buffer, so it is saved in checkpoints and moved with ``.to()``.
    Call order per step: ``probs = centering(logits, temp)`` (uses the center from previous
    steps), then ``centering.update(logits)``.

    Args:
        out_dim: number of prototypes K.
        momentum: EMA momentum in [0, 1]; ``center = m * center + (1 - m) * batch_mean``.
    """

    center: Tensor

    def __init__(self, out_dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"EMACentering: out_dim must be >= 1, got {out_dim} (dinov2/loss/centering.py).")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(
                f"EMACentering: momentum must lie in [0, 1], got {momentum} (dinov2/loss/centering.py)."
            )
        self.out_dim = out_dim
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def _check_width(self, teacher_logits: Tensor, where: str) -> None:
        if teacher_logits.shape[-1] != self.out_dim:
            raise ValueError(
                f"{where}: logits have {teacher_logits.shape[-1]} prototypes but the center has "
                f"{self.out_dim} (dinov2/loss/centering.py); build it with the head's out_dim."
            )

    @torch.no_grad()
    def softmax_center(
        self, teacher_logits: Tensor, teacher_temp: float, n_valid_rows: int | Tensor | None = None
    ) -> Tensor:
        """Centered, sharpened softmax.

        Args:
            teacher_logits: (R, K) teacher head outputs.
            teacher_temp: softmax temperature (> 0).
            n_valid_rows: if given, rows from this index on are padding and get zero targets.

        Returns:
            (R, K) float32 probabilities, ``softmax((logits - center) / teacher_temp)`` per row.
        """
        where = "EMACentering.softmax_center"
        _check_temperature(teacher_temp, where)
        n_valid = _valid_rows(teacher_logits, n_valid_rows, where)
        self._check_width(teacher_logits, where)
        with torch.autocast(device_type=teacher_logits.device.type, enabled=False):
            logits = teacher_logits[:n_valid].float()
            probs = torch.softmax((logits - self.center.float()) / teacher_temp, dim=-1)
        return _pad_rows(probs, teacher_logits.shape[0])

    def forward(self, teacher_logits: Tensor, teacher_temp: float, n_valid_rows: int | Tensor | None = None) -> Tensor:
        """Alias of :meth:`softmax_center` (the common centering interface)."""
        return self.softmax_center(teacher_logits, teacher_temp, n_valid_rows)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor, n_valid_rows: int | Tensor | None = None) -> None:
        """EMA step with the mean of the valid rows over the global batch (all ranks).

        Args:
            teacher_logits: (R, K) teacher head outputs of this step.
            n_valid_rows: if given, only the first ``n_valid_rows`` rows enter the mean.
        """
        where = "EMACentering.update"
        n_valid = _valid_rows(teacher_logits, n_valid_rows, where)
        self._check_width(teacher_logits, where)
        with torch.autocast(device_type=teacher_logits.device.type, enabled=False):
            row_sum = teacher_logits[:n_valid].float().sum(dim=0, keepdim=True)
            count = torch.tensor(float(n_valid), device=row_sum.device)
            _all_reduce_(row_sum)
            _all_reduce_(count)
            if count.item() == 0:
                # Nothing was observed anywhere: keep the center rather than divide by zero.
                return
            batch_center = (row_sum / count).to(self.center.dtype)
            self.center.mul_(self.momentum).add_(batch_center, alpha=1.0 - self.momentum)

    def extra_repr(self) -> str:
        return f"out_dim={self.out_dim}, momentum={self.momentum}"


def build_centering(
    kind: str, out_dim: int, momentum: float = 0.9, n_iterations: int = 3
) -> SinkhornKnopp | EMACentering:
    """Build the teacher-target module named by the config key ``centering``.

    Args:
        kind: ``"sinkhorn_knopp"`` or ``"softmax"`` (EMA-centred softmax).
        out_dim: number of prototypes K of the head the targets are for.
        momentum: center EMA momentum (``softmax`` only).
        n_iterations: Sinkhorn-Knopp rounds (``sinkhorn_knopp`` only).

    Returns:
        A module called as ``module(logits (R, K), teacher_temp, n_valid_rows=None) -> (R, K)``
        with an ``update(logits, n_valid_rows=None)`` method (no-op for Sinkhorn-Knopp). Build
        one per head (DINO CLS, iBOT patches): the EMA center is per head.
    """
    if kind == "sinkhorn_knopp":
        return SinkhornKnopp(n_iterations=n_iterations)
    if kind == "softmax":
        return EMACentering(out_dim, momentum=momentum)
    raise ValueError(
        f"Unknown centering '{kind}'; choose one of {', '.join(CENTERING_KINDS)} "
        "(config key 'centering', dinov2/loss/centering.py)."
    )
