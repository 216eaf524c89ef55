"""SimMIM's masking strategies (SimMIM section 3.2, Figure 2, Table 1)."""

import pytest
import torch

from mixmim.methods.simmim_masks import (
    block_cells,
    block_min_cells,
    random_cells,
    sample_cells,
    square_cells,
    square_side,
)


def test_random_masks_round_up_as_simmim():
    masks = random_cells((6, 6), 0.6, count=20, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (20, 6, 6) and (masks.flatten(1).sum(1) == 22).all()  # ceil(36 * 0.6)
    assert not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("ratio,side", [(0.11, 2), (0.25, 3), (0.44, 4)])
def test_square_is_one_square_of_the_requested_size(ratio, side):
    """Table 1's square rows on the 6x6 grid of 32-px cells of a 192-px image: 2x2, 3x3, 4x4."""
    assert square_side((6, 6), ratio) == side
    masks = square_cells((6, 6), ratio, count=50, generator=torch.Generator().manual_seed(1))
    corners = set()
    for mask in masks:
        rows, cols = mask.nonzero(as_tuple=True)
        top, left = int(rows.min()), int(cols.min())
        expected = torch.zeros(6, 6, dtype=torch.long)
        expected[top:top + side, left:left + side] = 1
        assert torch.equal(mask, expected)  # exactly one whole square, nothing else
        corners.add((top, left))
    assert len(corners) > 1  # it moves over the image (the relaxed central region)
    assert max(max(c) for c in corners) <= 6 - side


def test_square_side_is_clamped_to_the_grid():
    assert square_side((3, 5), 0.99) == 3 and square_side((6, 6), 0.01) == 1


def test_block_masks_cover_the_ratio_with_beit_sized_blocks():
    assert block_min_cells(16) == 16 and block_min_cells(32) == 4 and block_min_cells(64) == 1
    masks = block_cells((12, 12), 0.4, count=10, cell=16, generator=torch.Generator().manual_seed(2))
    assert (masks.flatten(1).sum(1) == 57).all()  # floor(144 * 0.4), as MixMIM's block masks


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match="mask_type='center'"):
        sample_cells("center", (6, 6), 0.5)
