"""Named configurations: sizes by the paper's C, H, B, checked without running the big models."""

import pytest
import torch

import mixmim
from mixmim.methods.options import decoder_defaults
from mixmim.models.registry import MODELS


def _analytic_params(embed_dim, depths, heads, windows=(14, 14, 14, 7), img=224, dec_dim=512, dec_depth=8):
    """Count written from the architecture description, independently of the model code."""
    total = 3 * 16 * embed_dim + embed_dim + 2 * embed_dim  # patch conv + bias + LayerNorm
    total += (img // 4) ** 2 * embed_dim  # fixed sine-cosine table (stored as a parameter)
    grid = img // 4
    for s, (d, h) in enumerate(zip(depths, heads)):
        c = embed_dim * 2**s
        ws = min(windows[s], grid)
        block = 2 * c + (3 * c * c + 3 * c) + (c * c + c) + 2 * c + (4 * c * c + 4 * c) + (4 * c * c + c)
        block += (2 * ws - 1) ** 2 * h
        total += d * block
        if s < len(depths) - 1:
            total += 2 * 4 * c + 4 * c * 2 * c  # merge norm + reduction (no bias)
            grid //= 2
    c = embed_dim * 2 ** (len(depths) - 1)
    encoder = total + 2 * c
    dec = c * dec_dim + dec_dim + dec_dim + (img // 32) ** 2 * dec_dim
    dec += dec_depth * (12 * dec_dim * dec_dim + 13 * dec_dim) + 2 * dec_dim + dec_dim * 3072 + 3072
    return encoder, encoder + dec


def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", ["mixmim_base", "mixmim_large", "mixmim_huge", "mixmim_tiny", "mixmim_small"])
def test_parameter_counts_follow_the_architecture(name):
    spec = MODELS[name]
    with torch.device("meta"):
        model = mixmim.create_pretrainer("mixmim", name)
    decoder = decoder_defaults(name)
    enc, total = _analytic_params(spec["embed_dim"], spec["depths"], spec["num_heads"],
                                  dec_dim=decoder["decoder_dim"], dec_depth=decoder["decoder_depth"])
    assert _count(model.encoder) == enc
    assert _count(model) == total


def test_base_matches_the_release_count():
    with torch.device("meta"):
        model = mixmim.create_pretrainer("mixmim", "mixmim_base")
    assert abs(_count(model) / 1e6 - 114.67) / 114.67 < 0.005
    with torch.device("meta"):
        clf = mixmim.create_classifier("mixmim_base", 1000)
    assert abs(_count(clf) / 1e6 - 88.34) / 88.34 < 0.005  # the paper's 88 M, head included


@pytest.mark.parametrize("name,c,h", [("mixmim_base", (128, 256, 512, 1024), (4, 8, 16, 32)),
                                      ("mixmim_large", (192, 384, 768, 1536), (6, 12, 24, 48)),
                                      ("mixmim_huge", (352, 704, 1408, 2816), (11, 22, 44, 88))])
def test_paper_configurations(name, c, h):
    with torch.device("meta"):
        enc = mixmim.create_encoder(name)
    assert tuple(enc.dims) == c and tuple(enc.num_heads) == h and tuple(enc.depths) == (2, 2, 18, 2)
    assert enc.window_sizes == [[14] * 2, [14] * 2, [14] * 18, [7] * 2]
    assert enc.layers[2].blocks[0].attn.relative_position_bias_table.shape == (27 * 27, h[2])


def test_classifier_averages_last_stage_after_norm():
    clf = mixmim.create_classifier("mixmim_tiny", num_classes=5, img_size=64, window_size=(8, 8, 4, 2))
    x = torch.randn(2, 3, 64, 64)
    tokens = clf.forward_features(x)
    torch.testing.assert_close(clf(x), clf.head(tokens.mean(1)))


def test_window_that_does_not_divide_feature_map_is_a_clear_error():
    with pytest.raises(ValueError, match="window_size=12 does not divide"):
        mixmim.create_encoder("mixmim_tiny", window_size=(12, 14, 14, 7))


@pytest.mark.parametrize("size", [(4, 4), (2, 8), (16, 16), (8, 2), (8, 8)])
def test_resize_groups_is_pytorchs_nearest_neighbour(size):
    """base.resize_groups is nearest-neighbour resampling (MixMIM section 2.3) as F.interpolate does
    it, on any map: each coarse position reads the first (top-left) fine position it covers."""
    from mixmim.models.base import resize_groups

    groups = torch.randint(0, 3, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    want = torch.nn.functional.interpolate(groups[:, None].float(), size=size, mode="nearest")[:, 0].long()
    assert torch.equal(resize_groups(groups, size), want)
