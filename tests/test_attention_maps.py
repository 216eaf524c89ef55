"""`mixmim attention` (MixedAE Figures 5 and 7): the last block's attention maps sum to one and equal the
attention computed by hand from the block's weights; a transposed attention matrix is caught."""

from __future__ import annotations

import pytest
import torch

import mixmim
from mixmim.cli import main
from mixmim.evaluation.attention_maps import attention_maps
from mixmim.interop.export import save_encoder
from mixmim.models.attention import window_partition

VIT = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2)
MIXMIM = dict(img_size=64, embed_dim=16, depths=(1, 1, 1, 2), num_heads=(1, 1, 2, 2), window_size=(4, 4, 2, 1))


def _softmax_rows(attn, x):
    b, n, c = x.shape
    h = attn.num_heads
    q, k, _ = attn.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    return ((q @ k.transpose(-2, -1)) * (c // h) ** -0.5).softmax(-1)  # (B, heads, queries, keys)


@pytest.mark.parametrize("class_token", [True, False])
def test_vit_maps_are_the_class_tokens_attention_or_the_mean_received(class_token):
    torch.manual_seed(0)
    options = dict(VIT, class_token=class_token, **({} if class_token else {"global_pool": "avg"}))
    encoder = mixmim.create_encoder("vit_base", **options).eval()
    with torch.no_grad():
        encoder.blocks[1].attn.qkv.weight.mul_(8)  # peaked attention: a random one is nearly uniform
    images = torch.randn(3, 3, 32, 32)
    maps = attention_maps(encoder, images)
    assert maps.shape == (3, 2, 4, 4)
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(3, 2))
    with torch.no_grad():
        tokens = encoder._pos_embed(encoder.patch_embed(images))
        tokens = encoder.blocks[0](tokens)
        probs = _softmax_rows(encoder.blocks[1].attn, encoder.blocks[1].norm1(tokens))
    if class_token:
        want = probs[:, :, 0, 1:] / probs[:, :, 0, 1:].sum(-1, keepdim=True)  # the class query's row
    else:
        want = probs.mean(-2)  # what each key receives, averaged over the queries
    torch.testing.assert_close(maps, want.reshape(3, 2, 4, 4))
    if class_token:  # the column (what the class token receives from each patch) is another picture
        column = probs[:, :, 1:, 0] / probs[:, :, 1:, 0].sum(-1, keepdim=True)
        assert (maps - column.reshape(3, 2, 4, 4)).abs().max() > 0.05


def test_mixmim_maps_average_each_window_and_weight_it_by_its_share():
    torch.manual_seed(0)
    encoder = mixmim.create_encoder("mixmim_tiny", **MIXMIM).eval()
    images = torch.randn(2, 3, 64, 64)
    maps = attention_maps(encoder, images)  # last stage: 2 x 2 tokens, window 1 -> four one-token windows
    assert maps.shape == (2, 2, 2, 2)
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(2, 2))
    torch.testing.assert_close(maps, torch.full_like(maps, 0.25))  # a one-token window attends to itself
    encoder = mixmim.create_encoder("mixmim_tiny", **dict(MIXMIM, window_size=(4, 4, 2, 2))).eval()
    with torch.no_grad():
        encoder.layers[-1].blocks[-1].attn.qkv.weight.mul_(8)
    seen = []
    block = encoder.layers[-1].blocks[-1]
    handle = block.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    maps = attention_maps(encoder, images)
    handle.remove()
    x = block.norm1(seen[-1]).reshape(2, 2, 2, -1)
    windows = window_partition(x, 2).reshape(2, 4, 128)
    attn = block.attn
    with torch.no_grad():
        q, k, _ = attn.qkv(windows).reshape(2, 4, 3, 2, 64).permute(2, 0, 3, 1, 4)
        probs = ((q @ k.transpose(-2, -1)) * 64**-0.5 + attn.relative_bias()).softmax(-1)
    want = probs.mean(-2).reshape(2, 2, 2, 2)  # one window of 2 x 2 tokens: the map is the mean received
    torch.testing.assert_close(maps, want)
    assert (want - 0.25).abs().max() > 0.05  # the mean over keys (a transposed matrix) would be uniform
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(2, 2))


def test_attention_verb_draws_two_models_side_by_side(tmp_path, class_folder, capsys):
    torch.manual_seed(0)
    save_encoder(mixmim.create_encoder("vit_base", **VIT), tmp_path / "a")
    save_encoder(mixmim.create_encoder("mixmim_tiny", **MIXMIM), tmp_path / "b")
    out = tmp_path / "maps.png"
    assert main(["attention", "--checkpoint", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                 "--labels", "ViT", "MixMIM", "--images", str(class_folder), "--max-images", "2",
                 "--output", str(out)]) == 0
    assert out.stat().st_size > 1000 and "ViT, MixMIM" in capsys.readouterr().out


def test_attention_verb_refuses_other_families_in_one_line(tmp_path, class_folder, capsys):
    save_encoder(mixmim.create_encoder("resnetv2_50", img_size=64, layers=(1, 1, 1, 1)), tmp_path / "r")
    assert main(["attention", "--checkpoint", str(tmp_path / "r.safetensors"), "--images", str(class_folder),
                 "--output", str(tmp_path / "m.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "vit and mixmim encoders" in err and "\n" not in err
