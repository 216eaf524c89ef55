"""Mask statistics and their alignment with 32-pixel cells (MixMIM section 2.2)."""

import math

import pytest
import torch

import mixmim
from conftest import TINY
from mixmim.methods.masking import block_groups, partner_sources, random_groups
from mixmim.models.base import resize_groups


@pytest.mark.parametrize("grid", [(7, 7), (4, 4), (12, 8)])
@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.75, 0.1])
def test_random_mask_sets_exactly_floor_L_ratio_cells(grid, ratio):
    masks = random_groups(grid, ratio, count=20)
    assert masks.shape == (20, *grid)
    assert set(masks.unique().tolist()) <= {0, 1}
    expected = math.floor(grid[0] * grid[1] * ratio)
    assert (masks.flatten(1).sum(1) == expected).all()


def test_random_mask_is_uniform_over_cells():
    masks = random_groups((7, 7), 0.5, count=4000, generator=torch.Generator().manual_seed(0))
    freq = masks.float().mean(0)
    # Every cell is chosen with probability 24/49; 4000 draws keep the estimate within 0.04.
    assert (freq - 24 / 49).abs().max() < 0.04


def test_k_way_masks_give_each_image_its_share():
    """MixMAE supplement Table 4, "k (1/k)": at 224 px (7 x 7 cells) and k = 5 the counts are 10 or 9,
    never 13/9/9/9/9, and every group is sometimes the one with fewer cells."""
    for k in range(3, 6):
        masks = random_groups((7, 7), num_groups=k, count=200, generator=torch.Generator().manual_seed(k))
        counts = torch.stack([(masks == g).flatten(1).sum(1) for g in range(k)], 1)
        assert (counts.sum(1) == 49).all()
        assert (counts.max(1).values - counts.min(1).values <= 1).all()
        assert set(counts.flatten().tolist()) <= {49 // k, 49 // k + 1}
        if 49 % k:
            for g in range(k):  # the spare cells are not always given to the same groups
                assert (counts[:, g] == 49 // k).any() and (counts[:, g] == 49 // k + 1).any(), (k, g)


def test_block_mask_has_exact_count():
    masks = block_groups((14, 14), 0.5, count=10, generator=torch.Generator().manual_seed(0))
    assert (masks.flatten(1).sum(1) == 98).all()


def test_nearest_upsampling_aligns_with_32_pixel_cells():
    model = mixmim.create_pretrainer("mixmim", "mixmim_base", **TINY)
    enc = model.encoder
    groups = random_groups(enc.grids[-1], 0.5)
    for stage in range(4):
        ids = enc.stage_groups(groups, stage)
        assert ids.shape[1:] == enc.grids[stage]
        # Back to pixels: one stage-s token covers patch * 2^s pixels.
        pixels = resize_groups(ids, (128, 128))[0]
        cells = pixels.reshape(4, 32, 4, 32).permute(0, 2, 1, 3).reshape(4, 4, 32 * 32)
        assert (cells == cells[..., :1]).all(), "a 32x32 cell holds two groups"
        assert torch.equal(cells[..., 0], groups[0])


def test_mixing_pixels_equals_the_releases_mixing_of_tokens():
    """Eq. 1 on the image, cell by cell, then the patch embedding, is the release's eq. 1 after the
    patch embedding (``x * (1 - m) + x.flip(0) * m``): no patch straddles a cell. The pixels are
    copies (exact); the embeddings of a patch computed in another row of the batch agree to float
    rounding (a kernel's blocking may depend on the row), so they are compared with a tolerance."""
    model = mixmim.create_pretrainer("mixmim", "mixmim_base", **TINY)
    images = torch.randn(4, 3, 128, 128)
    groups = random_groups(model.grid, 0.5)
    sources = partner_sources(4, 2)
    mixed_pixels = model.mix(images, groups, sources)
    pixel_mask = resize_groups(groups, (128, 128)).unsqueeze(1).bool()
    assert torch.equal(mixed_pixels, torch.where(pixel_mask, images.flip(0), images))
    tokens = model.encoder.patch_embed(images)
    m = resize_groups(groups, model.encoder.grids[0]).reshape(1, -1, 1).float()
    torch.testing.assert_close(model.encoder.embed(mixed_pixels, groups), tokens * (1 - m) + tokens.flip(0) * m,
                               rtol=0, atol=1e-5)


def test_partner_is_batch_reversed_for_two_images():
    assert partner_sources(4, 2).tolist() == [[0, 1, 2, 3], [3, 2, 1, 0]]
    with pytest.raises(ValueError, match="batch of at least 3"):
        partner_sources(2, 3)
