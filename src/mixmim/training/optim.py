"""AdamW for pretraining: lr = base_lr x global batch / 256, weight decay except on norms, biases,
positional tables (absolute and relative) and mask tokens (MixMIM Table 11, following MAE)."""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from torch import nn


def peak_lr(optim_cfg, global_batch: int) -> float:
    return optim_cfg.lr if optim_cfg.lr is not None else optim_cfg.base_lr * global_batch / 256


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names from the model's ``no_weight_decay()`` plus every parameter matching a keyword some
    sub-module lists in ``no_weight_decay_keywords()`` (the relative position bias tables)."""
    names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    keywords = set()
    for module in model.modules():
        if hasattr(module, "no_weight_decay_keywords"):
            keywords |= set(module.no_weight_decay_keywords())
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
