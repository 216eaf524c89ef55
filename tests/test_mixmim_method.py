"""Dual reconstruction and its loss (MixMIM eq. 2), API shapes and clear errors."""

import pytest
import torch

import mixmim
from conftest import TINY
from mixmim.methods.masking import random_groups
from mixmim.methods.patches import masked_mse


@pytest.fixture
def model():
    return mixmim.create_pretrainer("mixmim", "mixmim_base", **TINY)


def test_outputs_have_release_layout(model):
    images = torch.randn(4, 3, 128, 128)
    out = model(images, picture=True)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.picture.reconstruction.shape == (8, 16, 32 * 32 * 3)
    assert out.mask.shape == (1, 4, 4)
    assert int(out.mask.sum()) == 8
    out.loss.backward()
    assert model.decoder.mask_token.grad is not None


def test_every_cell_of_every_image_is_a_target_exactly_once(model):
    images = torch.randn(4, 3, 128, 128)
    out = model(images, picture=True).picture
    count = torch.zeros(4, 16)
    for row in range(out.hidden.shape[0]):
        count[out.sources[row]] += out.hidden[row].float()
    assert (count == 1).all()


def test_loss_counts_only_hidden_cells(model):
    images = torch.randn(4, 3, 128, 128)
    result = model(images, picture=True)
    out = result.picture
    base = masked_mse(out.reconstruction, out.target, out.hidden)
    torch.testing.assert_close(base, result.loss)
    visible_changed = torch.where(out.hidden.unsqueeze(-1), out.target, out.target + 5.0)
    torch.testing.assert_close(masked_mse(out.reconstruction, visible_changed, out.hidden), base)
    hidden_changed = torch.where(out.hidden.unsqueeze(-1), out.target + 5.0, out.target)
    assert masked_mse(out.reconstruction, hidden_changed, out.hidden) > base + 1.0


def test_loss_unchanged_when_visible_pixels_of_a_target_move(model):
    """End to end: the decoder row that sees a cell does not score it."""
    model.eval()
    images = torch.randn(2, 3, 128, 128)
    mask = random_groups(model.grid, 0.5)[0]
    result = model(images, mask=mask, picture=True)
    out = result.picture
    # Sequence 0 reconstructs image 0 and sees its group-0 cells; rescoring it with a target that
    # differs only there leaves the loss unchanged.
    target = out.target.clone()
    target[0, mask.flatten() == 0] += 3.0
    torch.testing.assert_close(masked_mse(out.reconstruction, target, out.hidden), result.loss)


def test_norm_pix_target_can_be_switched_off():
    m = mixmim.create_pretrainer("mixmim", "mixmim_base", **{**TINY, "norm_pix_loss": False})
    images = torch.rand(2, 3, 128, 128)
    out = m(images, picture=True).picture
    from mixmim.methods.patches import patchify

    torch.testing.assert_close(out.target[:2], patchify(images, 32))


def test_mask_argument_accepts_release_grid_and_per_sample(model):
    images = torch.randn(2, 3, 128, 128)
    m = torch.zeros(4, 4)
    m[0] = 1
    assert torch.equal(model(images, mask=m).mask[0], m.long())
    per_sample = random_groups(model.grid, 0.5, count=2)
    assert model(images, mask=per_sample).mask.shape == (2, 4, 4)


@pytest.mark.parametrize("size", [100, 130, 96 + 16])
def test_input_size_not_divisible_by_32_is_a_clear_error(model, size):
    with pytest.raises(ValueError, match=str(size)):
        model(torch.randn(2, 3, size, size))


def test_wrong_mask_shape_is_a_clear_error(model):
    with pytest.raises(ValueError, match=r"\(7, 7\)"):
        model(torch.randn(2, 3, 128, 128), mask=torch.zeros(7, 7))
    with pytest.raises(ValueError, match="0..1"):
        model(torch.randn(2, 3, 128, 128), mask=torch.full((4, 4), 2))


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_mask_ratio_outside_unit_interval_is_a_clear_error(ratio):
    with pytest.raises(ValueError, match=f"mask_ratio={ratio}"):
        mixmim.create_pretrainer("mixmim", "mixmim_base", **{**TINY, "mask_ratio": ratio})


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'mixmim_giant'"):
        mixmim.create_pretrainer("mixmim", "mixmim_giant")
    with pytest.raises(ValueError, match="unknown method 'byol'"):
        mixmim.create_pretrainer("byol", "mixmim_tiny")
    with pytest.raises(TypeError, match="decoder_width"):
        mixmim.create_pretrainer("mixmim", "mixmim_tiny", decoder_width=3)


def test_release_range_mask_ratio_alias():
    m = mixmim.create_pretrainer("mixmim", "mixmim_base", **{**TINY, "mask_ratio": 0.4, "range_mask_ratio": 0.2})
    assert m.config.mask_ratio_range == (0.4, 0.6)
    counts = {int(m.sample_mask(2).sum()) for _ in range(60)}
    assert min(counts) >= int(16 * 0.4) and max(counts) <= int(16 * 0.6) and len(counts) > 1
