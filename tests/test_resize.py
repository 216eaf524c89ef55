"""Loading weights at a new input size and new windows (MixMIM section 3)."""

import pytest
import torch

from conftest import TINY_ENCODER
from mixmim.models.attention import relative_position_index
from mixmim.models.mixmim_vit import MixMIMTransformer
from mixmim.models.resize import detection_windows, load_resized, resize_bias_table, resize_state_dict


def _encoder(**kw):
    return MixMIMTransformer(**{**TINY_ENCODER, **kw}).eval()


@pytest.mark.parametrize("learnable", [False, True])
def test_unchanged_configuration_is_bit_identical(learnable):
    source = _encoder(learnable_pos_embed=learnable)
    with torch.no_grad():  # make the tables non-trivial so a resize would show
        for p in source.parameters():
            p.add_(0.01 * torch.randn_like(p))
    target = _encoder(learnable_pos_embed=learnable)
    # A release-style state dict also carries the index buffers: they are dropped and rebuilt.
    state = dict(source.state_dict())
    state["layers.0.blocks.0.attn.relative_position_index"] = relative_position_index(16)
    load_resized(target, state)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key


def test_bias_table_resize_is_bicubic_and_identity_at_same_size():
    table = torch.randn(13 * 13, 3)
    assert resize_bias_table(table, 7) is table
    bigger = resize_bias_table(table, 10)
    assert bigger.shape == (19 * 19, 3)
    # The centre (zero offset) stays near the original centre value: a smooth resize, not a re-init.
    assert torch.allclose(bigger.reshape(19, 19, 3)[9, 9], table.reshape(13, 13, 3)[6, 6], atol=0.5)


def test_224_checkpoint_at_384_with_release_windows():
    # Encoder of the release layout (windows 14/14/14/7 at 224), narrow so the test stays fast.
    arch = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4))
    source = MixMIMTransformer(img_size=224, window_size=(14, 14, 14, 7), learnable_pos_embed=True, **arch)
    target = MixMIMTransformer(img_size=384, window_size=(16, 16, 24, 12), learnable_pos_embed=True,
                               num_classes=10, **arch).eval()
    load_resized(target, source.state_dict())
    assert target.absolute_pos_embed.shape == (1, 96 * 96, 16)
    assert target.layers[0].blocks[0].attn.relative_position_bias_table.shape == (31 * 31, 1)
    assert target.layers[2].blocks[0].attn.relative_position_bias_table.shape == (47 * 47, 2)
    assert target.layers[3].blocks[0].attn.relative_position_bias_table.shape == (23 * 23, 4)
    with torch.no_grad():
        out = target(torch.randn(1, 3, 384, 384))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_fixed_positions_are_recomputed_not_interpolated():
    source = _encoder()
    target = MixMIMTransformer(**{**TINY_ENCODER, "img_size": 256})
    state = resize_state_dict(source.state_dict(), target)
    assert torch.equal(state["absolute_pos_embed"], target.absolute_pos_embed)


def test_detection_windows_16_with_32_every_sixth_block_of_stage_3():
    windows = detection_windows((2, 2, 18, 2))
    assert windows[0] == windows[1] == windows[3] == 16
    assert [i + 1 for i, w in enumerate(windows[2]) if w == 32] == [6, 12, 18]
    arch = dict(embed_dim=8, depths=(1, 1, 6, 1), num_heads=(1, 1, 2, 2))
    source = MixMIMTransformer(img_size=224, **arch)
    target = MixMIMTransformer(img_size=512, window_size=detection_windows(arch["depths"]), **arch).eval()
    load_resized(target, source.state_dict())
    assert target.window_sizes[2] == [16] * 5 + [32]
    assert target.layers[2].blocks[0].attn.relative_position_bias_table.shape == (31 * 31, 2)
    assert target.layers[2].blocks[5].attn.relative_position_bias_table.shape == (63 * 63, 2)
    with torch.no_grad():
        feats = target.forward_features(torch.randn(1, 3, 512, 512))
    assert feats.shape == (1, 16 * 16, 64) and torch.isfinite(feats).all()


def test_head_count_mismatch_is_a_one_line_error():
    source = _encoder()
    target = MixMIMTransformer(**{**TINY_ENCODER, "num_heads": (2, 2, 2, 4)})
    with pytest.raises(ValueError, match="heads"):
        resize_state_dict(source.state_dict(), target)
