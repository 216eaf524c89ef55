"""Learning rate, set every iteration: linear warm-up, then either a half-cosine to ``min_lr`` (MAE /
MixMIM Table 11; SimMIM section 4.1.1) or a step schedule that holds the peak and divides it by
``1 / step_gamma`` at given fractions of the run (SimMIM section 4.3: 4e-4 for 7/8 of the epochs,
then divided by 10; appendix B, Table 9: decays at 90% and 95%). Parameter groups may carry an
``lr_scale`` (layer decay), applied on top."""

from __future__ import annotations

import math
from typing import Sequence

from torch.optim import Optimizer

SCHEDULES: tuple[str, ...] = ("cosine", "step")


def check_steps(fractions: Sequence[float], gamma: float) -> None:
    """Milestones must be increasing fractions of the run in (0, 1]; the factor in (0, 1]."""
    values = [float(f) for f in fractions]
    if not values or any(not 0.0 < f <= 1.0 for f in values) or values != sorted(set(values)):
        raise ValueError(f"optim.step_fractions={list(fractions)}: expected increasing fractions of the run in (0, 1]")
    if not 0.0 < float(gamma) <= 1.0:
        raise ValueError(f"optim.step_gamma={gamma}: expected a factor in (0, 1]")


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, min_lr: float = 0.0, *,
          schedule: str = "cosine", step_fractions: Sequence[float] = (0.875,), step_gamma: float = 0.1) -> float:
    """Learning rate of optimiser step ``step`` (0-based) of ``total_steps``.

    ``cosine``: from the end of the warm-up the rate follows a half-cosine from ``peak`` to ``min_lr``.
    ``step``: the rate is ``peak * step_gamma ** k`` where k milestones have passed; milestone ``f``
    is step ``round(f * total_steps)``, counted from the start of the run (warm-up included), as
    SimMIM's "lasts for 7/8 of the total training epochs" counts; ``min_lr`` is not used.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if schedule == "step":
        check_steps(step_fractions, step_gamma)  # at step 0 too: a bad recipe fails at once
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "step":
        passed = sum(step >= round(f * total_steps) for f in step_fractions)
        return peak * step_gamma**passed
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
