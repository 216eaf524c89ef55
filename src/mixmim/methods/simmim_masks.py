"""SimMIM's masking strategies (SimMIM section 3.2, Figure 2, Table 1), each drawing masks on a grid
of ``cell``-pixel squares (the "masked patch size"): a tensor ``(count, h, w)`` of 0 (visible) and
1 (masked).

- ``random``: patch-aligned random masking, ``ceil(L * ratio)`` of the L cells (SimMIM's own
  generator rounds up).
- ``square``: one k x k square of cells, the context encoder's central region "relaxed to be
  randomly movable on the image": it lies at a uniformly random cell offset, whole inside the
  image. Table 1 names it by its size (2x2, 3x3, 4x4 cells of 32 px on the 6x6 grid of a 192-px
  image, ratios 0.11 / 0.25 / 0.44), so k is the whole number nearest to ``sqrt(ratio * L)``.
- ``block``: BEiT's block-wise masking, through :func:`mixmim.methods.masking.block_groups`
  (rectangles of log-uniform aspect in [0.3, 1/0.3] until ``floor(L * ratio)`` cells are covered).
  BEiT's smallest block is 16 patches of 16 px, i.e. 64 x 64 pixels; SimMIM applies it to cells
  of 16 and 32 px, so we keep that smallest *area in pixels* (16 cells of 16 px, 4 cells of 32 px).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mixmim.methods.masking import block_groups
from mixmim.methods.options import MASK_TYPES, check_ratio

BEIT_MIN_BLOCK_PIXELS = 16 * 16 * 16  # BEiT: at least 16 patches of 16x16 pixels per block


def random_cells(grid: tuple[int, int], ratio: float, count: int = 1,
                 generator: torch.Generator | None = None) -> Tensor:
    """``count`` masks with ``ceil(L * ratio)`` cells drawn uniformly without replacement."""
    check_ratio(ratio)
    h, w = grid
    length = h * w
    masked = math.ceil(length * ratio)
    masks = torch.zeros(count, length, dtype=torch.long)
    for i in range(count):
        masks[i, torch.randperm(length, generator=generator)[:masked]] = 1
    return masks.reshape(count, h, w)


def square_side(grid: tuple[int, int], ratio: float) -> int:
    """Side k (cells) of the square whose area is nearest to ``ratio`` of the grid, at least 1 and at
    most the shorter side of the grid."""
    check_ratio(ratio)
    h, w = grid
    return max(1, min(h, w, round(math.sqrt(ratio * h * w))))


def square_cells(grid: tuple[int, int], ratio: float, count: int = 1,
                 generator: torch.Generator | None = None) -> Tensor:
    """``count`` masks, each one k x k square (k from :func:`square_side`) at a random offset."""
    h, w = grid
    k = square_side(grid, ratio)
    masks = torch.zeros(count, h, w, dtype=torch.long)
    for i in range(count):
        top = int(torch.randint(0, h - k + 1, (), generator=generator))
        left = int(torch.randint(0, w - k + 1, (), generator=generator))
        masks[i, top:top + k, left:left + k] = 1
    return masks


def block_min_cells(cell: int) -> int:
    """BEiT's smallest block (64 x 64 pixels) in cells of ``cell`` pixels, at least one cell."""
    return max(1, round(BEIT_MIN_BLOCK_PIXELS / (cell * cell)))


def block_cells(grid: tuple[int, int], ratio: float, count: int = 1, cell: int = 16,
                generator: torch.Generator | None = None) -> Tensor:
    """``count`` BEiT block-wise masks on a grid of ``cell``-pixel cells."""
    return block_groups(grid, ratio, count=count, min_cells=block_min_cells(cell), generator=generator)


def sample_cells(kind: str, grid: tuple[int, int], ratio: float, count: int = 1, cell: int = 32,
                 generator: torch.Generator | None = None) -> Tensor:
    """Masks of strategy ``kind`` (one of :data:`MASK_TYPES`) on a ``grid`` of ``cell``-pixel cells."""
    if kind == "random":
        return random_cells(grid, ratio, count, generator)
    if kind == "square":
        return square_cells(grid, ratio, count, generator)
    if kind == "block":
        return block_cells(grid, ratio, count, cell, generator)
    raise ValueError(f"mask_type={kind!r}: expected one of {', '.join(MASK_TYPES)}")
