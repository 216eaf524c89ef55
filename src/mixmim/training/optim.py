"""Optimisers from parameter groups: AdamW (pretraining, MixMIM Table 11; fine-tuning, Table 12), SGD
with momentum, and LARS (MAE's linear probe).

Weight decay spares the 1-d parameters (norms, biases) and whatever the trained module itself
declares. Each method declares its exclusions as its reference implementation does: MixMIM none (the
release builds its groups with timm's ``add_weight_decay`` and no skip list, so the decoder's mask
token and the relative position bias tables are decayed), SimMIM its mask token, positions and bias
tables.

LARS is timm's, set up as MAE's ``util/lars.py``: trust coefficient 0.001, momentum 0.9, and neither
weight decay nor the trust ratio for parameters of at most one dimension (MAE: "no rate scaling or
weight decay for parameters <= 1D"); timm's adds 1e-8 to the gradient norm, MAE's does not.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.optim import Lars, create_optimizer_v2, param_groups_weight_decay
from torch import nn

from mixmim.config import OptimConfig


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names the model (the method, not its sub-modules) lists in ``no_weight_decay()``, plus every
    parameter whose name contains a keyword of its ``no_weight_decay_keywords()``."""
    names: set[str] = set(getattr(model, "no_weight_decay", lambda: set())())
    keywords = set(getattr(model, "no_weight_decay_keywords", lambda: set())())
    names |= {n for n, _ in model.named_parameters() if any(k in n for k in keywords)}
    return names


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """timm's grouping: 1-d parameters and the names above without weight decay, the rest with it."""
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_weight_decay_names(model))


def build_optimizer(groups: list[dict[str, Any]] | nn.Module, optim: OptimConfig, lr: float,
                    device: torch.device) -> torch.optim.Optimizer:
    """The optimiser ``optim.name`` names over ``groups`` (a module: :func:`decay_groups` of it)."""
    if isinstance(groups, nn.Module):
        groups = decay_groups(groups, optim.weight_decay)
    groups = [g for g in groups if g["params"]]
    if optim.name == "lars":
        for group in groups:  # MAE's LARS: the trust ratio only for parameters of more than one dimension
            group["always_adapt"] = all(p.ndim > 1 for p in group["params"])
            if not group["always_adapt"]:
                group["weight_decay"] = 0.0
        return Lars(groups, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay, trust_coeff=0.001)
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    fused = optim.fused if optim.fused is not None else device.type == "cuda"
    extra: dict[str, Any] = {"fused": True} if fused else {}
    return create_optimizer_v2(groups, "adamw", lr=lr, weight_decay=optim.weight_decay, betas=tuple(optim.betas),
                               **extra)
