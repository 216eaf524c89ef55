"""Fixed 2D sine-cosine positional tables and their resizing.

MixMIM uses the fixed 2D sine-cosine embedding of MAE for the encoder's absolute positions (on the
stage-1 grid) and for the decoder (on the last-stage grid), MixMIM paper section 2.2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(len(positions), dim): first half sines, second half cosines, frequencies 1 / 10000^(2k/dim)."""
    if dim % 2:
        raise ValueError(f"sine-cosine embedding needs an even width, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.double().reshape(-1)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(grid_h * grid_w, dim) row-major table: the first half of the channels encodes the column,
    the second half the row (the layout of MAE's ``get_2d_sincos_pos_embed``)."""
    if dim % 4:
        raise ValueError(f"2D sine-cosine embedding needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    table = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)
    return table.float()


def resize_pos_table(table: torch.Tensor, old_hw: Sequence[int], new_hw: Sequence[int]) -> torch.Tensor:
    """Bicubic resize of a (1, H*W, C) positional table to a new grid (for loading at a new resolution)."""
    if tuple(old_hw) == tuple(new_hw):
        return table
    c = table.shape[-1]
    grid = table.reshape(1, old_hw[0], old_hw[1], c).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_hw), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], c).to(table.dtype)
