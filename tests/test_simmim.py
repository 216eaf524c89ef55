"""SimMIM (SimMIM paper section 3 and the ablations of section 4.1): [MASK] token at the input, the
heads of Table 2, the target resolutions of Table 3, the loss areas of Table 4 and the targets of
Table 5 / 13."""

import pytest
import torch
import torch.nn.functional as F

import mixmim
from conftest import TINY_ENCODER, TINY_ENCODERS
from mixmim.methods.patches import unpatchify
from mixmim.methods.simmim import SimMIMConfig, colour_bins, value_errors, weighted_mean
from mixmim.methods.simmim_heads import InverseSwinHead, TokenHead, build_head


def build(**options):
    return mixmim.create_pretrainer("simmim", "mixmim_base", **{**TINY_ENCODER, **options})


def swin(**options):
    return mixmim.create_pretrainer("simmim", "swin_tiny", **{**TINY_ENCODERS["swin_tiny"], **options})


def pixel_mask(mask, cell):
    """(G, h, w) cell mask -> (G, 3, H, W) bool, for the hand-written losses."""
    return mask.repeat_interleave(cell, 1).repeat_interleave(cell, 2).unsqueeze(1).expand(-1, 3, -1, -1).bool()


def prediction_map(model, out, size=128):
    """The head's prediction at the target resolution, read back from the (B, L, stride^2 x 3)
    reconstruction (which repeats a coarse prediction over its d x d pixels)."""
    d = model.config.target_downsample
    full = unpatchify(out.picture.reconstruction, model.cell, (size // model.cell, size // model.cell))
    return full[..., ::d, ::d]


def test_defaults_follow_the_paper():
    c = SimMIMConfig()
    assert (c.mask_type, c.mask_ratio, c.mask_cell, c.head, c.target_downsample, c.loss_area, c.loss,
            c.norm_pix_loss) == ("random", 0.6, 32, "linear", 1, "masked", "l1", False)
    model = build()
    assert isinstance(model.head, TokenHead) and isinstance(model.head.proj, torch.nn.Linear)
    assert model.head.proj.out_features == 32 * 32 * 3
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
    out = model(images, mask=mask, picture=True)
    at = model.encoder.stage_groups(mask, 0).reshape(2, -1).bool()
    tokens = model.encoder.patch_embed(images).detach()
    assert torch.equal(seen["x"][at], model.mask_token.detach()[0].expand(int(at.sum()), -1))  # copied: exact
    torch.testing.assert_close(seen["x"][~at], tokens[~at])
    out.loss.backward()
    assert model.mask_token.grad.abs().sum() > 0


def test_loss_is_l1_on_masked_pixels_only():
    model = build().eval()
    images = torch.rand(2, 3, 128, 128)
    mask = model.sample_mask(2)
    out = model(images, mask=mask, picture=True)
    pred = prediction_map(model, out)
    pixels = pixel_mask(mask, 32)
    torch.testing.assert_close(out.loss, (pred - images).abs()[pixels].mean())
    # For a given prediction, moving the visible pixels of the target leaves the loss as it is.
    weight = pixels[:, :1].float()
    moved = torch.where(pixels, images, images + 7.0)
    torch.testing.assert_close(weighted_mean(value_errors(pred, moved, "l1"), weight), out.loss)
    # Moving the masked pixels leaves the prediction as it is (the [MASK] token hides them from the
    # encoder) but not the loss.
    again = model(torch.where(pixels, images + 7.0, images), mask=mask, picture=True)
    torch.testing.assert_close(again.picture.reconstruction, out.picture.reconstruction, rtol=0, atol=1e-6)
    assert again.loss > out.loss + 1.0
    assert out.picture.hidden.shape == (2, 16) and torch.equal(out.picture.hidden, mask.flatten(1).bool())


def test_full_image_loss_covers_the_visible_pixels_too():
    """Table 4: prediction + reconstruction, l1 over every pixel."""
    model = build(loss_area="full").eval()
    images = torch.rand(2, 3, 128, 128)
    mask = model.sample_mask(2)
    out = model(images, mask=mask, picture=True)
    torch.testing.assert_close(out.loss, (prediction_map(model, out) - images).abs().mean())
    pixels = pixel_mask(mask, 32)
    assert model(torch.where(pixels, images, images + 7.0), mask=mask).loss > out.loss + 1.0
    assert out.picture.hidden.all()


@pytest.mark.parametrize("loss,reference", [("l2", F.mse_loss), ("smooth_l1", F.smooth_l1_loss)])
def test_regression_losses_of_table_5(loss, reference):
    model = build(loss=loss).eval()
    images = torch.randn(2, 3, 128, 128)
    mask = model.sample_mask(2)
    out = model(images, mask=mask, picture=True)
    pixels = pixel_mask(mask, 32)
    torch.testing.assert_close(out.loss, reference(prediction_map(model, out)[pixels], images[pixels]))


def test_cells_smaller_than_the_stride_score_their_own_pixels():
    model = build(mask_cell=16)
    mask = model.sample_mask(2)
    assert mask.shape == (2, 8, 8) and (mask.flatten(1).sum(1) == 39).all()  # ceil(64 * 0.6)
    images = torch.rand(2, 3, 128, 128)
    out = model(images, mask=mask, picture=True)
    pixels = pixel_mask(mask, 16)
    torch.testing.assert_close(out.loss, (prediction_map(model, out) - images).abs()[pixels].mean())


@pytest.mark.parametrize("d", [2, 8, 32])
def test_lower_prediction_resolution_predicts_the_averaged_image(d):
    """Table 3: the target is the image averaged over d x d pixels; a target pixel counts by the masked
    share of its area (with 16-px cells and d = 32 a target pixel holds four cells)."""
    model = build(target_downsample=d, mask_cell=16).eval()
    assert model.head.proj.out_features == (32 // d) ** 2 * 3
    images = torch.rand(2, 3, 128, 128)
    mask = model.sample_mask(2)
    out = model(images, mask=mask, picture=True)
    pred = prediction_map(model, out)
    assert pred.shape == (2, 3, 128 // d, 128 // d)
    target = F.avg_pool2d(images, d)
    share = F.avg_pool2d(pixel_mask(mask, 16)[:, :1].float(), d)
    expected = ((pred - target).abs() * share).sum() / (share.sum() * 3)
    torch.testing.assert_close(out.loss, expected)
    if d == 32:
        assert ((share > 0) & (share < 1)).any()  # partly masked target pixels exist and count by share


def test_colour_bins_are_equal_bins_of_the_8_bit_values():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    levels = torch.tensor([0, 31, 32, 127, 128, 255], dtype=torch.float32)
    images = ((levels / 255 - 0.5) / 0.25).view(1, 1, 1, -1).expand(1, 3, 1, -1)
    assert colour_bins(images, 8, mean, std)[0, 0, 0].tolist() == [0, 0, 1, 3, 4, 7]
    assert colour_bins(images, 256, mean, std)[0, 0, 0].tolist() == [0, 31, 32, 127, 128, 255]
    assert colour_bins(images, 2, mean, std)[0, 0, 0].tolist() == [0, 0, 0, 0, 1, 1]


def test_bin_target_is_a_per_channel_classification():
    """Table 5 / 13: 3 x bins logits per target pixel, cross-entropy per channel on the masked pixels."""
    model = build(loss="bins", num_bins=4, target_downsample=4).eval()
    assert model.head.proj.out_features == (32 // 4) ** 2 * 3 * 4
    images = torch.randn(2, 3, 128, 128).clamp(-2, 2)
    mask = model.sample_mask(2)
    logits = {}
    model.head.register_forward_hook(lambda m, i, o: logits.__setitem__("map", o.detach()))
    out = model(images, mask=mask, picture=True)
    assert logits["map"].shape == (2, 3 * 4, 32, 32)
    target = colour_bins(F.avg_pool2d(images, 4), 4, model.config.pixel_mean, model.config.pixel_std)
    ce = F.cross_entropy(logits["map"].reshape(2, 3, 4, 32, 32).permute(0, 2, 1, 3, 4), target, reduction="none")
    share = F.avg_pool2d(pixel_mask(mask, 32)[:, :1].float(), 4).expand(-1, 3, -1, -1)
    torch.testing.assert_close(out.loss, (ce * share).sum() / share.sum())
    assert out.picture.reconstruction.shape == (2, 16, 32 * 32 * 3)  # bin centres, for pictures


def test_weighted_mean_divides_by_the_masked_values():
    errors = torch.arange(8.0).view(1, 2, 2, 2)
    weight = torch.tensor([[1.0, 0.0], [0.5, 0.0]]).view(1, 1, 2, 2)
    assert weighted_mean(errors, weight).item() == pytest.approx((0 + 4 + 0.5 * 2 + 0.5 * 6) / (1.5 * 2))
    assert value_errors(torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), "l1").sum() == 3


@pytest.mark.parametrize("head", ["linear", "mlp", "inverse_swin_t", "inverse_swin_b"])
def test_heads_predict_the_image_at_the_target_resolution(head):
    encoder = mixmim.create_encoder("swin_tiny", **TINY_ENCODERS["swin_tiny"])
    for values, d in ((3, 1), (3 * 8, 4)):
        module = build_head(head, encoder, values, d, window=4)
        latent = torch.randn(2, 16, encoder.num_features)
        assert module(latent).shape == (2, values, 128 // d, 128 // d)
    if head.startswith("inverse"):
        assert isinstance(module, InverseSwinHead) and module.out_grid == (32, 32)  # stride 4 tokens
        with pytest.raises(ValueError, match="target_downsample=8"):
            build_head(head, encoder, 3, 8)


@pytest.mark.parametrize("head,paper", [("linear", 89.9), ("mlp", 90.9), ("inverse_swin_t", 115.2),
                                        ("inverse_swin_b", 174.8)])
def test_head_sizes_match_table_2(head, paper):
    """Table 2 gives the parameters of Swin-B with each head (192 px, window 6): ours are within 0.5M."""
    with torch.device("meta"):
        model = mixmim.create_pretrainer("simmim", "swin_base", img_size=192, window_size=6, head=head)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(paper, abs=0.5)


def test_inverse_swin_head_trains_on_a_swin():
    model = swin(head="inverse_swin_t", head_window=4)
    images = torch.randn(2, 3, 128, 128)
    out = model(images)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.head.stages[-1][0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mask_type", ["square", "block"])
def test_other_masks_drive_the_method(mask_type):
    model = swin(mask_type=mask_type, mask_cell=16, mask_ratio=0.25)
    mask = model.sample_mask(3)
    assert mask.shape == (3, 8, 8)
    out = model(torch.randn(3, 3, 128, 128), mask=mask)
    assert torch.isfinite(out.loss) and torch.equal(out.mask, mask)


def test_inputs_show_the_masked_cells_as_the_mean_colour():
    model = build().eval()
    images = torch.randn(2, 3, 128, 128)
    mask = model.sample_mask(2)
    out = model(images, mask=mask, picture=True)
    pixels = pixel_mask(mask, 32)
    assert (out.picture.inputs[pixels] == 0).all() and torch.equal(out.picture.inputs[~pixels], images[~pixels])


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="mask_cell=6"):
        build(mask_cell=6)
    with pytest.raises(ValueError, match="loss='huber'"):
        SimMIMConfig(loss="huber").validate()
    with pytest.raises(ValueError, match="mask_type='center'"):
        SimMIMConfig(mask_type="center").validate()
    with pytest.raises(ValueError, match="head='mae'"):
        SimMIMConfig(head="mae").validate()
    with pytest.raises(ValueError, match="num_bins=512"):
        SimMIMConfig(loss="bins", num_bins=512).validate()
    with pytest.raises(ValueError, match="norm_pix_loss"):
        SimMIMConfig(loss="bins", norm_pix_loss=True).validate()
    with pytest.raises(ValueError, match="target_downsample=64"):
        build(target_downsample=64)
    with pytest.raises(TypeError, match="decoder_dim"):
        build(decoder_dim=32)


@pytest.mark.parametrize("d", [1, 2])
def test_norm_pix_target_is_normalised_per_predicted_token(d):
    """``norm_pix_loss`` (MAE's target, not in SimMIM): the (downsampled) target is normalised over
    each last-stage token's patch, i.e. over the 32/d x 32/d target pixels x 3 channels it predicts."""
    model = build(norm_pix_loss=True, target_downsample=d)
    images = torch.rand(2, 3, 128, 128)
    small = F.avg_pool2d(images, d) if d > 1 else images
    per = 32 // d
    patches = small.unfold(2, per, per).unfold(3, per, per)  # (B, 3, 4, 4, per, per)
    mean = patches.mean(dim=(1, 4, 5), keepdim=True)
    var = patches.var(dim=(1, 4, 5), keepdim=True)  # unbiased, as MAE's code
    expected = ((patches - mean) / (var + 1e-6).sqrt()).permute(0, 1, 2, 4, 3, 5).reshape(2, 3, 128 // d, 128 // d)
    torch.testing.assert_close(model.make_target(images), expected)
