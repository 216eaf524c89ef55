"""Loading encoder weights at a new input size and new window sizes (MixMIM section 3).

A 224 checkpoint fine-tunes at 384 with windows 16/16/24/12 (the release's 384 setting) and runs
detection with window 16 and 32-window blocks (the 6th, 12th and 18th of stage 3). What depends on
the grid or the window is adapted to the target model at load time:

- ``absolute_pos_embed``: a fixed sine-cosine table is recomputed for the new grid (the target
  model already holds it); a learnable one is resized bicubically.
- ``relative_position_bias_table`` of every block: ((2w-1)^2, heads) resized bicubically to
  ((2w'-1)^2, heads) as a (2w-1) x (2w-1) image per head (Swin Transformer's recipe).
- ``relative_position_index`` (and the release's ``attn_mask``): dropped; the model rebuilds them
  from its window size.

Tensors whose shapes already fit are passed through untouched, so an unchanged configuration loads
bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixmim.models.base import GroupedEncoder
from mixmim.models.pos_embed import resize_pos_table

_REBUILT = ("relative_position_index", "attn_mask")


def resize_bias_table(table: Tensor, new_window: int) -> Tensor:
    """Bicubic resize of a ((2w-1)^2, heads) relative position bias table to window ``new_window``."""
    side = math.isqrt(table.shape[0])
    if side * side != table.shape[0]:
        raise ValueError(f"relative position table with {table.shape[0]} rows is not a square grid")
    new_side = 2 * new_window - 1
    if side == new_side:
        return table
    heads = table.shape[1]
    grid = table.T.reshape(1, heads, side, side).float()
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return grid.reshape(heads, new_side * new_side).T.contiguous().to(table.dtype)


def _grid_of(length: int, source_grid: Sequence[int] | None) -> tuple[int, int]:
    if source_grid is not None:
        h, w = (int(v) for v in source_grid)
        if h * w != length:
            raise ValueError(f"source_grid={h}x{w} does not match a position table of {length} entries")
        return h, w
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"position table of {length} entries is not square; pass source_grid=(h, w)")
    return side, side


def resize_state_dict(state: Mapping[str, Tensor], model: nn.Module,
                      source_grid: Sequence[int] | None = None) -> dict[str, Tensor]:
    """``state`` (encoder names, any image size and windows) adapted to the shapes of ``model``.

    ``model`` is the target :class:`~mixmim.models.mixmim_vit.MixMIMTransformer` (or any module with
    the same parameter names, e.g. a classifier). ``source_grid``: the stage-1 grid of the checkpoint
    when it is not square. Keys the model does not have are kept (``load_state_dict`` reports them).
    """
    target = model.state_dict()
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in _REBUILT:
            continue
        want = target.get(key)
        if want is None or want.shape == value.shape:
            out[key] = value
        elif key.endswith("relative_position_bias_table"):
            if value.shape[1] != want.shape[1]:
                raise ValueError(f"{key}: checkpoint has {value.shape[1]} heads, the model {want.shape[1]}")
            out[key] = resize_bias_table(value, (math.isqrt(want.shape[0]) + 1) // 2)
        elif key == "pos_embed" and hasattr(model, "num_prefix_tokens"):
            # A ViT's table: class-token rows first, then the patch grid.
            if not model.pos_embed.requires_grad:
                out[key] = want.clone()
            else:
                prefix = cast(int, model.num_prefix_tokens)
                old = _grid_of(value.shape[1] - prefix, source_grid)
                grid = resize_pos_table(value[:, prefix:], old, tuple(cast(GroupedEncoder, model).grids[0]))
                out[key] = grid if not prefix else torch.cat([value[:, :prefix], grid], dim=1)
        elif key == "absolute_pos_embed":
            if not model.absolute_pos_embed.requires_grad:
                out[key] = want.clone()  # fixed sine-cosine: the target's own table is exact
            else:
                old = _grid_of(value.shape[1], source_grid)
                out[key] = resize_pos_table(value, old, tuple(cast(GroupedEncoder, model).grids[0]))
        else:
            raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} does not fit the model's "
                             f"{tuple(want.shape)} and cannot be resized")
    return out


def state_mismatch(state: Mapping[str, Tensor], target: Mapping[str, Tensor], allow_missing: Sequence[str] = ()) -> str:
    """What keeps ``state`` from loading strictly into a module whose state dict is ``target``: missing
    and unexpected names, shapes that differ ("" when it fits). Missing names starting with one of
    ``allow_missing`` (a new head) are allowed. The one check behind every "does this file fit" error."""
    missing = sorted(k for k in set(target) - set(state) if not k.startswith(tuple(allow_missing)))
    unexpected = sorted(set(state) - set(target))
    shapes = sorted(k for k in set(target) & set(state) if tuple(target[k].shape) != tuple(state[k].shape))

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

    parts = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
             "shape differs for " + few([f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in shapes])
             if shapes else ""]
    return "; ".join(p for p in parts if p)


def load_resized(model: nn.Module, state: Mapping[str, Tensor], source_grid: Sequence[int] | None = None,
                 allow_missing: Sequence[str] = ("head.",)) -> list[str]:
    """Resize ``state`` to ``model`` and load it; missing keys are an error unless they start with one
    of ``allow_missing`` (a new head). Returns the missing keys that were allowed."""
    resized = resize_state_dict(state, model, source_grid)
    problem = state_mismatch(resized, model.state_dict(), allow_missing)
    if problem:
        raise ValueError(f"checkpoint does not fit the model (another model or size?): {problem}")
    missing, _ = model.load_state_dict(resized, strict=False)
    return list(missing)


def detection_windows(depths: Sequence[int], window: int = 16, global_window: int = 32,
                      every: int = 6, stage: int = 2) -> list[int | list[int]]:
    """Per-block window sizes of MixMIM section 3's detection setting: ``window`` everywhere, and
    ``global_window`` for every ``every``-th block of ``stage`` (0-based; the 6th, 12th and 18th
    block of stage 3 by default)."""
    out: list[int | list[int]] = [window] * len(depths)
    out[stage] = [global_window if (i + 1) % every == 0 else window for i in range(depths[stage])]
    return out
