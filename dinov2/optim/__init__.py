"""Optimisation: per-iteration schedules and the optimizer's parameter groups.

Shared by pretraining (:mod:`dinov2.train`) and finetuning (:mod:`dinov2.eval`), so neither has
to import the other for them:

* :mod:`.schedules`: :class:`CosineScheduler` (freeze, warm-up, cosine) and
  :func:`build_schedulers` (every schedule of a pretraining run from its config);
* :mod:`.param_groups`: :func:`get_param_groups` (layer-wise LR decay, weight-decay
  exclusions, last-layer flag) and :func:`apply_optim_scheduler` (write one iteration's values
  into the groups).

Depends on torch and numpy only.
"""

from .param_groups import apply_optim_scheduler, get_param_groups
from .schedules import CosineScheduler, build_schedulers, scaled_lr

__all__ = ["CosineScheduler", "apply_optim_scheduler", "build_schedulers", "get_param_groups", "scaled_lr"]
