"""Layer-wise learning-rate decay for fine-tuning (MixMIM section 8 / Table 12, after BEiT and ELECTRA).

Every block of every stage is one layer, the patch merging after stage i counts with stage i + 1,
the embeddings are layer 0 and the final norm with the head share the last block's layer; a parameter
of layer l gets its learning rate multiplied by ``decay ** (L + offset - l)``, L the last layer and
``offset`` the model's ``layer_decay_offset`` (1 for the MixMIM encoder: the release's
``get_layer_id_for_mixmim`` counts one layer more than it assigns, so no parameter keeps the full
rate; 0, timm's and MAE's rule, elsewhere). Weight decay spares the 1-d parameters (norms, biases)
and whatever the model itself declares in ``no_weight_decay()`` / ``no_weight_decay_keywords()``
(nothing more for the MixMIM encoder, as in the release).

The grouping is the model's ``group_matcher``; timm's optimiser factory does the rest.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import group_parameters
from timm.optim import create_optimizer_v2, param_groups_layer_decay
from torch import nn


def no_weight_decay_patterns(model: nn.Module) -> set[str]:
    """fnmatch patterns of parameters excluded from weight decay besides the 1-D ones (norms, biases):
    the model's ``no_weight_decay`` names and, as wildcards, its ``no_weight_decay_keywords``
    (timm's factory reads only the former; the relative position tables are 2-D)."""
    patterns = set(getattr(model, "no_weight_decay", lambda: set())())
    patterns |= {f"*{word}*" for word in getattr(model, "no_weight_decay_keywords", lambda: set())()}
    return patterns


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Parameter name -> layer id (0 = embeddings, last = final norm + head)."""
    return group_parameters(model, model.group_matcher(coarse=False), reverse=True)


def param_groups(model: nn.Module, weight_decay: float = 0.05, layer_decay: float = 0.7) -> list[dict[str, Any]]:
    """Optimiser parameter groups with ``lr_scale`` (honoured by timm's schedulers and by
    :func:`apply_lr`) and per-group weight decay."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay={layer_decay} must be in (0, 1]")
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay,
                                      no_weight_decay_list=no_weight_decay_patterns(model))
    offset = getattr(model, "layer_decay_offset", 0)
    for group in groups:
        group["lr_scale"] *= layer_decay**offset
    return groups


def create_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05, layer_decay: float | None = 0.7,
                     betas: tuple[float, float] = (0.9, 0.999), opt: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (0.9, 0.999) with layer-wise decay through timm's factory (Table 12's optimiser).
    ``layer_decay=None`` keeps one scale for all layers (norms and tables still without decay)."""
    if layer_decay is None:
        layer_decay = 1.0
    return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, betas=betas,
                               param_group_fn=lambda m: param_groups(m, weight_decay, layer_decay))


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate to ``lr`` times its ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
