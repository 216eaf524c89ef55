"""Learning rate: linear warmup then half-cosine to ``min_lr``, set every iteration (MAE / MixMIM
Table 11). Parameter groups may carry an ``lr_scale`` (layer decay), applied on top."""

from __future__ import annotations

import math

from torch.optim import Optimizer


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, min_lr: float = 0.0) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
