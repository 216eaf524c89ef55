"""Building an encoder from the weights :func:`mixmim.interop.weights.open_weights` read, at the size the
task needs: weights go through :func:`mixmim.models.resize.resize_state_dict`, so the image size and
the window sizes may differ from pretraining (MixMIM section 3).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from mixmim.interop.weights import Pretrained
from mixmim.models.registry import encoder_args, family_class
from mixmim.models.resize import load_resized

if TYPE_CHECKING:
    from mixmim.models.base import GroupedEncoder

__all__ = ["Pretrained", "build_encoder", "input_size", "parse_windows"]

# What a pretraining run chose that a transfer task must not inherit.
_NOT_INHERITED = ("num_classes", "drop_rate", "attn_drop_rate", "drop_path_rate")


def build_encoder(pretrained: Pretrained, **overrides: Any) -> nn.Module:
    """An encoder of ``pretrained``'s family and architecture, ``overrides`` (img_size, window_size,
    num_classes, drop_path_rate, ...) applied, and the weights loaded (resized where the grid or a
    window changed; a new head stays freshly initialised)."""
    cls = family_class(pretrained.family)
    accepted = set(encoder_args(pretrained.family))
    config = {k: v for k, v in pretrained.config.items() if k not in _NOT_INHERITED}
    config.update({k: v for k, v in overrides.items() if v is not None})
    if "drop_path_rate" in config and "drop_path_rate" not in accepted:
        config.pop("drop_path_rate")
    unknown = [k for k in config if k not in accepted]
    if unknown:
        raise ValueError(f"unknown {pretrained.family} encoder option(s) {', '.join(unknown)}")
    _check_sizes(cls, config, pretrained.family)
    model = cls(**config)
    if pretrained.state:
        with torch.device("meta"):  # the checkpoint's own grid, for resizing position tables
            source = cls(**{k: v for k, v in pretrained.config.items() if k in accepted and k != "num_classes"})
        target = model.state_dict()
        # A head of another class count (a release fine-tuning checkpoint) is replaced by a new one.
        state = {k: v for k, v in pretrained.state.items()
                 if not (k.startswith("head.") and (k not in target or target[k].shape != v.shape))}
        fresh = ["head."]
        if _norm_moved_after_pooling(state, target):
            # timm's global_pool="avg" puts the final norm after the pooling (fc_norm): as MAE's
            # main_finetune.py (its only missing keys: head.* and fc_norm.*) and BEiT's mean pooling, the
            # pretrained norm is dropped and fc_norm starts fresh.
            state = {k: v for k, v in state.items() if not k.startswith("norm.")}
            fresh.append("fc_norm.")
        load_resized(model, state, source_grid=cast("GroupedEncoder", source).grids[0], allow_missing=fresh)
    return model


def _norm_moved_after_pooling(state: Mapping[str, Any], target: Mapping[str, Any]) -> bool:
    """Whether weights with a final ``norm`` meet an encoder whose final norm is ``fc_norm`` (after an
    average pooling) and the weights have none."""
    return ("norm.weight" in state and "norm.weight" not in target and "fc_norm.weight" in target
            and "fc_norm.weight" not in state)


def _check_sizes(cls: type, config: Mapping[str, Any], family: str) -> None:
    """An image size that is a positive whole number (or two), and an encoder that fits in this machine's
    memory: a config read from a file must not make the process allocate hundreds of gigabytes."""
    size = config.get("img_size")
    sides = size if isinstance(size, (list, tuple)) else [size]
    if size is not None and not (1 <= len(sides) <= 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                              for v in sides)):
        raise ValueError(f"img_size {size!r}: expected a positive whole number of pixels (or [height, width])")
    try:
        with torch.device("meta"):  # the architecture only: no memory
            probe = cls(**config)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ValueError(f"the {family} encoder cannot be built with {dict(config)}: {exc}") from None
    need = sum(t.numel() * t.element_size() for t in [*probe.parameters(), *probe.buffers()])
    have = _physical_memory()
    if have and need > have / 2:
        raise ValueError(f"the {family} encoder at img_size {size} needs {need / 2**30:.1f} GiB for its weights alone "
                         f"(this machine has {have / 2**30:.1f} GiB): is the image size right?")


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def input_size(pretrained: Pretrained, requested: int | None) -> tuple[int | list[int], int]:
    """(img_size for the model, side length for the transforms): ``requested`` or the checkpoint's."""
    img_size = requested or pretrained.config.get("img_size", 224)
    return img_size, img_size if isinstance(img_size, int) else int(img_size[0])


def parse_windows(text: str | None) -> int | list[int | list[int]] | None:
    """``"8,8,4,2"`` -> [8, 8, 4, 2]; a stage may list one window per block: ``"16,16,16+16+32,16"``."""
    if text is None or text == "":
        return None
    try:
        stages = [[int(v) for v in part.split("+")] for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--window-size {text!r}: expected comma-separated integers per stage, "
                         "'+' between the windows of one stage's blocks") from None
    if len(stages) == 1 and len(stages[0]) == 1:
        return stages[0][0]  # one window for every stage (a Swin's window_size=7)
    return [s[0] if len(s) == 1 else s for s in stages]
