"""Learning rate, set every iteration: linear warm-up, then a half-cosine to ``min_lr`` (MAE / MixMIM
Table 11; SimMIM section 4.1.1), a step schedule that holds the peak and divides it by
``1 / step_gamma`` at given fractions of the run (SimMIM section 4.3: 4e-4 for 7/8 of the epochs, then
divided by 10; appendix B, Table 9: decays at 90% and 95%), or a linear ("poly", power 1) decay
(BEiT's segmentation schedule). Parameter groups may carry an ``lr_scale`` (layer decay), applied on
top.

Where the authors' codes differ, both are here: MAE's code warms up from 0 (``lr x step / warmup``)
and starts the cosine at the end of the warm-up; SimMIM's code warms up from its own
``WARMUP_LR`` through timm's ``CosineLRScheduler`` with ``warmup_prefix=False``, so its cosine spans the
whole run with the warm-up inside it (``cosine_after_warmup=False``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch.optim import Optimizer

from mixmim.config import OptimConfig, check_steps

SCHEDULES: tuple[str, ...] = ("cosine", "step", "poly")


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, min_lr: float = 0.0, *,
          schedule: str = "cosine", step_fractions: Sequence[float] = (0.875,), step_gamma: float = 0.1,
          warmup_lr: float = 0.0, cosine_after_warmup: bool = True) -> float:
    """Learning rate of optimiser step ``step`` (0-based) of ``total_steps``.

    Warm-up (``step < warmup_steps``): ``warmup_lr + (peak - warmup_lr) x step / warmup_steps``: MAE's
    ``util/lr_sched.py`` (which the MixMIM release keeps) with ``warmup_lr`` 0, timm's schedulers with
    their ``warmup_lr_init`` (SimMIM's code).
    ``cosine``: a half-cosine from ``peak`` to ``min_lr`` over the steps after the warm-up
    (``cosine_after_warmup``) or over the whole run (SimMIM's code). ``step``: ``peak x step_gamma ** k``
    where k milestones have passed; milestone ``f`` is step ``round(f x total_steps)``, counted from the
    start of the run (warm-up included), as SimMIM's "lasts for 7/8 of the total training epochs"
    counts. ``poly``: linear from ``peak`` after the warm-up to ``min_lr`` at the end.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if schedule == "step":
        check_steps(step_fractions, step_gamma)  # at step 0 too: a bad recipe fails at once
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_lr + (peak - warmup_lr) * step / warmup_steps
    if schedule == "step":
        passed = sum(step >= round(f * total_steps) for f in step_fractions)
        return peak * step_gamma**passed
    start = warmup_steps if (cosine_after_warmup or schedule == "poly") else 0
    progress = min(1.0, (step - start) / max(1, total_steps - start))
    if schedule == "poly":
        return min_lr + (peak - min_lr) * (1.0 - progress)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """The learning-rate schedule of one run: ``schedule(step)`` is the rate of optimiser step ``step``."""

    total_steps: int
    warmup_steps: int
    peak: float
    min_lr: float
    warmup_lr: float
    config: OptimConfig

    def __call__(self, step: int) -> float:
        o = self.config
        return lr_at(step, self.total_steps, self.warmup_steps, self.peak, self.min_lr, schedule=o.schedule,
                     step_fractions=o.step_fractions, step_gamma=o.step_gamma, warmup_lr=self.warmup_lr,
                     cosine_after_warmup=o.cosine_after_warmup)


def peak_lr(optim: OptimConfig, lr_batch: int) -> float:
    """``optim.lr``, or ``base_lr x lr_batch / lr_batch_divisor`` (the linear scaling rule)."""
    return optim.lr if optim.lr is not None else optim.base_lr * lr_batch / optim.lr_batch_divisor


def build_schedule(optim: OptimConfig, total_steps: int, steps_per_epoch: int, lr_batch: int) -> Schedule:
    """The schedule a config describes for a run of ``total_steps`` (warm-up in steps or epochs, capped at
    the run; with ``scale_lr_bounds`` the floor and the warm-up start scale with the batch as the peak)."""
    warmup = optim.warmup_steps if optim.warmup_steps is not None else round(optim.warmup_epochs * steps_per_epoch)
    scale = lr_batch / optim.lr_batch_divisor if optim.scale_lr_bounds else 1.0
    warmup_lr = optim.warmup_lr * scale
    return Schedule(total_steps, min(warmup, total_steps), peak_lr(optim, lr_batch), optim.min_lr * scale, warmup_lr,
                    optim)


def set_lr(optimizer: Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
