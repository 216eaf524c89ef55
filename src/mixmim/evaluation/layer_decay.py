"""Layer-wise learning-rate decay for fine-tuning (MixMIM section 8 / Table 12, after BEiT and ELECTRA).

A parameter of layer l gets its learning rate multiplied by ``decay ** (L - l)``, L the last layer.
Two rules say which layer a parameter is in:

- ``auto``: the encoder's own ``group_matcher`` through timm's factory. For the MixMIM encoder that
  is the release's ``get_layer_id_for_mixmim``: every block of every stage is one layer, the patch
  merging after stage i counts with stage i + 1, the embeddings are layer 0, and the final norm and
  the head share the last block's id while the count has one layer more (``layer_decay_offset = 1``:
  their scale is ``decay ** 1``, no parameter keeps the full rate). timm's and MAE's rule elsewhere:
  the final norm and the head are the last layer (scale 1); timm's Swin counts its patch merging
  (at the start of stage i) with stage i's first block.
- ``simmim``: SimMIM's code (``optimizer.py``: ``get_swin_layer`` / ``get_vit_layer``): the patch
  merging belongs to the stage *before* it (SimMIM's Swin merges at the end of a stage: the id of
  that stage's last block), and everything that is not an embedding or a block (the final norm, the
  head) is the last layer, at the full rate.

Weight decay spares the 1-d parameters (norms, biases) and whatever the model itself declares in
``no_weight_decay()`` / ``no_weight_decay_keywords()`` (nothing more for the MixMIM encoder, as in
the release). timm's optimiser factory does the rest.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

import torch
from timm.models import group_parameters
from timm.optim import create_optimizer_v2, param_groups_layer_decay
from torch import nn

if TYPE_CHECKING:
    from timm.models.swin_transformer import SwinTransformerStage

RULES = ("auto", "simmim")


def no_weight_decay_patterns(model: nn.Module) -> set[str]:
    """fnmatch patterns of parameters excluded from weight decay besides the 1-D ones (norms, biases):
    the model's ``no_weight_decay`` names and, as wildcards, its ``no_weight_decay_keywords``
    (timm's factory reads only the former; the relative position tables are 2-D)."""
    patterns = set(getattr(model, "no_weight_decay", lambda: set())())
    patterns |= {f"*{word}*" for word in getattr(model, "no_weight_decay_keywords", lambda: set())()}
    return patterns


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Parameter name -> layer id by the ``auto`` rule (0 = embeddings, last = final norm + head)."""
    matcher = cast("Callable[..., dict[str, Any]]", model.group_matcher)  # timm's, which every family has
    return group_parameters(model, matcher(coarse=False), reverse=True)


def simmim_layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """(parameter name -> layer id, number of layers) by SimMIM's ``get_swin_layer`` / ``get_vit_layer``
    for this project's Swin (timm's names: patch merging at the start of stage i) and ViT encoders."""
    family = getattr(model, "family", "")
    if family in ("swin", "swinv2"):
        depths = [len(stage.blocks) for stage in cast("Iterable[SwinTransformerStage]", model.layers)]
        count = sum(depths) + 2

        def layer(name: str) -> int:
            parts = name.split(".")
            if parts[0] in ("patch_embed", "mask_token"):  # SimMIM's code: anything else is the last layer
                return 0
            if parts[0] == "layers":
                stage = int(parts[1])
                if parts[2] == "downsample":  # SimMIM's layers.{stage-1}.downsample: its stage's last block
                    return sum(depths[:stage])
                return sum(depths[:stage]) + int(parts[3]) + 1
            return count - 1
    elif family == "vit":
        count = len(cast(nn.Sequential, model.blocks)) + 2  # timm's ViT: a Sequential of blocks

        def layer(name: str) -> int:
            parts = name.split(".")
            if name in ("cls_token", "mask_token", "pos_embed") or parts[0] == "patch_embed":
                return 0
            if parts[0] == "blocks":
                return int(parts[1]) + 1
            return count - 1
    else:
        raise ValueError(f"optim.layer_decay_rule='simmim' is SimMIM's rule for Swin and ViT encoders, not "
                         f"{family or type(model).__name__}")
    return {n: layer(n) for n, _ in model.named_parameters()}, count


def param_groups(model: nn.Module, weight_decay: float = 0.05, layer_decay: float = 0.7,
                 rule: str = "auto") -> list[dict[str, Any]]:
    """Optimiser parameter groups with ``lr_scale`` (honoured by the loop's schedule and timm's
    schedulers) and per-group weight decay."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay={layer_decay} must be in (0, 1]")
    if rule not in RULES:
        raise ValueError(f"optim.layer_decay_rule={rule!r}: expected one of {', '.join(RULES)}")
    patterns = no_weight_decay_patterns(model)
    if rule == "simmim":
        return _grouped(model, *simmim_layer_ids(model), weight_decay, layer_decay, patterns)
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay,
                                      no_weight_decay_list=patterns)
    offset = getattr(model, "layer_decay_offset", 0)
    for group in groups:
        group["lr_scale"] *= layer_decay**offset
    return groups


def _grouped(model: nn.Module, ids: dict[str, int], count: int, weight_decay: float, layer_decay: float,
             patterns: set[str]) -> list[dict[str, Any]]:
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or any(fnmatch.fnmatch(name, p) for p in patterns)
        key = (ids[name], no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": layer_decay ** (count - 1 - ids[name])}
        groups[key]["params"].append(param)
    return list(groups.values())


def create_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05, layer_decay: float | None = 0.7,
                     betas: tuple[float, float] = (0.9, 0.999), opt: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (0.9, 0.999) with layer-wise decay through timm's factory (Table 12's optimiser).
    ``layer_decay=None`` keeps one scale for all layers (norms and tables still without decay)."""
    if layer_decay is None:
        layer_decay = 1.0
    return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, betas=betas,
                               param_group_fn=lambda m: param_groups(m, weight_decay, layer_decay))


def dense_param_groups(model: nn.Module, encoder: nn.Module, weight_decay: float = 0.05,
                       layer_decay: float = 1.0, no_decay_keywords: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Parameter groups of a detector or segmentor whose backbone is ``encoder``: the encoder's layers
    decayed (ViTDet's and BEiT's rule: layer l of L gets ``decay ** (L + 1 - l)``, so the last block is
    already decayed once), everything else (neck, heads) at the full rate; weight decay as in
    :func:`param_groups`, and none on names holding one of ``no_decay_keywords`` (BEiT's segmentation
    keeps the relative position tables out). MixMIM Table 4's 0.85 / 0.9 for B / L."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay={layer_decay} must be in (0, 1]")
    path = next(name for name, module in model.named_modules() if module is encoder)
    prefix = f"{path}." if path else ""
    inner = layer_ids(encoder)
    heads = max(inner.values(), default=-1) + 1  # one above the encoder's last layer: scale 1
    ids = {name: inner.get(name[len(prefix):], heads) if name.startswith(prefix) else heads
           for name, _ in model.named_parameters()}
    patterns = {prefix + p for p in no_weight_decay_patterns(encoder)} | {f"*{k}*" for k in no_decay_keywords}
    return _grouped(model, ids, heads + 1, weight_decay, layer_decay, patterns)
