"""SimMIM on the MixMIM encoder (SimMIM paper section 3): [MASK] token at the input, linear head,
l1 loss on the masked pixels only."""

import pytest
import torch

import mixmim
from conftest import TINY_ENCODER
from mixmim.methods.patches import patchify, unpatchify
from mixmim.methods.simmim import SimMIMConfig


def build(**options):
    return mixmim.create_pretrainer("simmim", "mixmim_base", **{**TINY_ENCODER, **options})


def test_defaults_follow_the_paper():
    c = SimMIMConfig()
    assert (c.mask_ratio, c.mask_cell, c.loss, c.norm_pix_loss) == (0.6, 32, "l1", False)
    model = build()
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 32 * 32 * 3
    masks = model.sample_mask(5)
    assert masks.shape == (5, 4, 4) and (masks.flatten(1).sum(1) == 10).all()  # ceil(16 * 0.6)


def test_mask_token_replaces_masked_patches_at_the_encoder_input(monkeypatch):
    model = build()
    seen = {}
    original = model.encoder.forward_tokens
    monkeypatch.setattr(model.encoder, "forward_tokens",
                        lambda x, *a, **k: (seen.__setitem__("x", x.detach().clone()), original(x, *a, **k))[1])
    images = torch.randn(2, 3, 128, 128)
    mask = model.sample_mask(2)
    out = model(images, mask=mask)
    at = model.encoder.stage_groups(mask, 0).reshape(2, -1).bool()
    tokens = model.encoder.patch_embed(images).detach()
    assert torch.equal(seen["x"][at], model.mask_token.detach()[0].expand(int(at.sum()), -1))
    assert torch.equal(seen["x"][~at], tokens[~at])
    out.loss.backward()
    assert model.mask_token.grad.abs().sum() > 0


def test_loss_is_l1_on_masked_pixels_only():
    model = build()
    model.eval()
    images = torch.rand(2, 3, 128, 128)
    mask = model.sample_mask(2)
    out = model(images, mask=mask)
    pred = unpatchify(out.reconstruction.detach(), 32, (4, 4))
    pixels = mask.repeat_interleave(32, 1).repeat_interleave(32, 2).unsqueeze(1).expand(-1, 3, -1, -1).bool()
    torch.testing.assert_close(out.loss, (pred - images).abs()[pixels].mean())
    # Moving visible pixels of the target leaves the loss as it is; moving masked ones does not.
    target = patchify(torch.where(pixels, images, images + 7.0), 32)
    weight = patchify(pixels.float(), 32)
    torch.testing.assert_close(model.pixel_loss(out.reconstruction, target, weight), out.loss)
    target = patchify(torch.where(pixels, images + 7.0, images), 32)
    assert model.pixel_loss(out.reconstruction, target, weight) > out.loss + 1.0


def test_cells_smaller_than_the_stride_score_their_own_pixels():
    model = build(mask_cell=16)
    mask = model.sample_mask(2)
    assert mask.shape == (2, 8, 8) and (mask.flatten(1).sum(1) == 39).all()  # ceil(64 * 0.6)
    images = torch.rand(2, 3, 128, 128)
    out = model(images, mask=mask)
    pred = unpatchify(out.reconstruction.detach(), 32, (4, 4))
    pixels = mask.repeat_interleave(16, 1).repeat_interleave(16, 2).unsqueeze(1).expand(-1, 3, -1, -1).bool()
    torch.testing.assert_close(out.loss, (pred - images).abs()[pixels].mean())


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="mask_cell=6"):
        build(mask_cell=6)
    with pytest.raises(ValueError, match="loss='huber'"):
        SimMIMConfig(loss="huber").validate()
    with pytest.raises(TypeError, match="decoder_dim"):
        build(decoder_dim=32)
