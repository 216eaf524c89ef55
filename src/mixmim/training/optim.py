"""AdamW for pretraining: lr = base_lr x global batch / 256 (MixMIM Table 11, following MAE), weight
decay on every parameter except the 1-d ones (norms, biases) and those the method itself declares.

Each method declares its exclusions as its reference implementation does: MixMIM none (the release
builds its groups with timm's ``add_weight_decay`` and no skip list, so the decoder's mask token and
the relative position bias tables are decayed), SimMIM its mask token, positions and bias tables."""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from torch import nn


def peak_lr(optim_cfg, global_batch: int) -> float:
    return optim_cfg.lr if optim_cfg.lr is not None else optim_cfg.base_lr * global_batch / 256


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names the model (the method, not its sub-modules) lists in ``no_weight_decay()``, plus every
    parameter whose name contains a keyword of its ``no_weight_decay_keywords()``."""
    names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    keywords = set(model.no_weight_decay_keywords()) if hasattr(model, "no_weight_decay_keywords") else set()
    names |= {n for n, _ in model.named_parameters() if any(k in n for k in keywords)}
    return names


def build_optimizer(model: nn.Module, optim_cfg, global_batch: int, device: torch.device) -> torch.optim.Optimizer:
    """timm's grouping (1-d shapes and the names above without decay) and timm's AdamW factory."""
    fused = optim_cfg.fused if optim_cfg.fused is not None else device.type == "cuda"
    extra = {"fused": True} if fused else {}
    groups = param_groups_weight_decay(model, optim_cfg.weight_decay,
                                       no_weight_decay_list=no_weight_decay_names(model))
    return create_optimizer_v2(groups, "adamw", lr=peak_lr(optim_cfg, global_batch),
                               weight_decay=optim_cfg.weight_decay, betas=tuple(optim_cfg.betas), **extra)
