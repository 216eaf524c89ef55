"""ResNet-v2 (BiT) with mixed convolution and per-image GroupNorm (MixMIM supplement section 9)."""

from __future__ import annotations

import pytest
import torch

import mixmim
import mixmim.models.resnet as resnet
from conftest import TINY_ENCODERS
from mixmim.models.base import resize_groups
from mixmim.models.resnet import ResNetV2Encoder

TINY = TINY_ENCODERS["resnetv2_50"]
CHECKER = torch.tensor([[(i + j) % 2 for j in range(4)] for i in range(4)])


def _tiny(**extra) -> ResNetV2Encoder:
    return mixmim.create_encoder("resnetv2_50", **TINY, **extra).double().eval()


def _encode(encoder, x, groups, k=None):
    return encoder.forward_tokens(encoder.embed(x, groups), groups, num_groups=k)


def test_group_norm_statistics_are_per_image(monkeypatch):
    """Changing image 1's pixels leaves image 0's tokens unchanged. With convs still mixed but a plain
    (per-sample) GroupNorm, image 1's mean and variance reach image 0: the same check then fails."""
    encoder = _tiny()
    groups = torch.stack([CHECKER, 1 - CHECKER])
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    other = resize_groups(groups, (128, 128)).unsqueeze(1) == 1
    changed = torch.where(other, 10 * x + 3, x)
    own = resize_groups(groups, encoder.grids[-1]).reshape(2, -1) == 0

    def image0(images):
        with torch.no_grad():
            return _encode(encoder, images, groups, 2)[own]

    torch.testing.assert_close(image0(changed), image0(x), rtol=0, atol=1e-12)

    monkeypatch.setattr(resnet, "mixed_group_norm", lambda norm, x, groups, num_groups=None: norm(x))
    assert not torch.allclose(image0(changed), image0(x), rtol=0, atol=1e-6)


def test_single_group_equals_plain_path():
    encoder = _tiny()
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    with torch.no_grad():
        plain_tokens = encoder.embed(x)
        plain = encoder.forward_stages(plain_tokens) + [encoder.forward_tokens(plain_tokens)]
        for groups in (torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(2, 32, 32, dtype=torch.long)):
            tokens = encoder.embed(x, groups)
            torch.testing.assert_close(tokens, plain_tokens, rtol=0, atol=1e-10)
            grouped = encoder.forward_stages(tokens, groups, num_groups=1) + [_encode(encoder, x, groups, 1)]
            for got, expected in zip(grouped, plain):
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_plain_path_is_timm_forward_features():
    encoder = _tiny()
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    with torch.no_grad():
        expected = encoder.forward_features(x).flatten(2).transpose(1, 2)
        assert torch.equal(encoder.forward_tokens(encoder.embed(x)), expected)


def test_stem_keeps_simmim_mask_cells_apart():
    """SimMIM embeds with its 0/1 mask on cells as small as the first stride (4 pixels)."""
    encoder = _tiny()
    mask = (torch.rand(2, 32, 32) < 0.5).long()
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64, requires_grad=True)
    tokens = encoder.embed(x, mask)
    assert tokens.shape == (2, 32 * 32, encoder.embed_dim)
    pixels = resize_groups(mask, (128, 128))
    for g in (0, 1):
        x.grad = None
        (tokens[0] * (mask[0].reshape(-1, 1) == g)).sum().backward(retain_graph=True)
        grad = x.grad.abs().sum(1)
        assert grad[1].max() == 0 and grad[0][pixels[0] != g].max() == 0
        assert grad[0][pixels[0] == g].max() > 0


def test_mix_embeddings_and_checkpointing():
    """Stage embeddings reach every stage; activation checkpointing changes no value and no gradient."""
    encoder = _tiny()
    groups = CHECKER[None]
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    embeds = [torch.zeros(2, d, dtype=torch.float64, requires_grad=True) for d in encoder.stage_in_dims]
    out = encoder.forward_tokens(encoder.embed(x, groups), groups, restrict_attention=False, stage_embeds=embeds)
    with torch.no_grad():
        torch.testing.assert_close(out, encoder.forward_tokens(encoder.embed(x, groups)), rtol=0, atol=0)
    out.square().sum().backward()
    assert all(e.grad.abs().amin(dim=1).gt(0).all() for e in embeds)

    def grads():
        encoder.zero_grad()
        _encode(encoder, x, groups, 2).square().sum().backward()
        return [p.grad.clone() for p in encoder.parameters()]

    plain = grads()
    encoder.set_grad_checkpointing(True)
    for got, expected in zip(grads(), plain):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_config_rebuilds_the_encoder():
    encoder = _tiny()
    again = ResNetV2Encoder(**encoder.config()).double()
    again.load_state_dict(encoder.state_dict(), strict=True)
    assert encoder.config()["layers"] == [1, 1, 1, 1] and again.dims == encoder.dims
    assert (encoder.embed_dim, encoder.stage_in_dims, encoder.dims) == (32, [32, 128, 256, 512], [128, 256, 512, 1024])
    assert encoder.grids == [(32, 32), (16, 16), (8, 8), (4, 4)] and encoder.num_features == 1024


def test_resnet50x4_is_bits_layout_four_times_as_wide():
    """SimMIM's appendix ResNet-50x4 (no BiT release): layers 3/4/6/3, every width x4 (stage outputs
    1024 / 2048 / 4096 / 8192), 375 M parameters; built on the meta device."""

    with torch.device("meta"):
        encoder = mixmim.create_encoder("resnetv2_50x4")
    assert [s["num_chs"] for s in encoder.feature_info[1:]] == [1024, 2048, 4096, 8192]
    assert [len(stage.blocks) for stage in encoder.stages] == [3, 4, 6, 3]
    assert sum(p.numel() for p in encoder.parameters()) / 1e6 == pytest.approx(375.35, abs=0.01)
