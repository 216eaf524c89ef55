"""timm's feature API on the MixMIM encoder (issue 23): feature_info, forward_intermediates,
prune_intermediate_layers and ``timm.create_model(..., features_only=True)``."""

from __future__ import annotations

import pytest
import timm
import torch

import mixmim  # noqa: F401  (registers mixmim_* with timm)
from mixmim.models.mixmim_vit import MixMIMTransformer


def test_features_only_mixmim_base_gives_the_four_stage_maps_at_224():
    """Shapes only, on the meta device: no memory, no arithmetic."""
    with torch.device("meta"):
        model = timm.create_model("mixmim_base", features_only=True)
        maps = model(torch.empty(2, 3, 224, 224))
    assert [tuple(m.shape) for m in maps] == [(2, 128, 56, 56), (2, 256, 28, 28), (2, 512, 14, 14), (2, 1024, 7, 7)]
    assert model.feature_info.channels() == [128, 256, 512, 1024]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.module_name() == ["layers.0", "layers.1", "layers.2", "layers.3"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    enc = MixMIMTransformer(img_size=64, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4),
                            window_size=(8, 4, 4, 2)).eval()
    for p in enc.parameters():  # non-trivial norms, so that a skipped or misplaced norm shows
        p.data.add_(torch.randn_like(p) * 0.1)
    return enc


def test_feature_info_matches_the_maps(tiny):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = tiny.forward_intermediates(x, intermediates_only=True)
    assert len(maps) == len(tiny.feature_info) == 4
    for m, info in zip(maps, tiny.feature_info):
        assert m.shape[1] == info["num_chs"]
        assert (64 // m.shape[2], 64 // m.shape[3]) == (info["reduction"], info["reduction"])
        assert m.is_contiguous()


def test_forward_intermediates_are_the_stage_outputs_and_the_last_normed_is_forward_features(tiny):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stages = tiny.forward_stages(tiny.embed(x))
        final, maps = tiny.forward_intermediates(x, norm=True)
        tokens = tiny.forward_features(x)
        plain = tiny.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
    h, w = tiny.grids[-1]
    torch.testing.assert_close(final, tokens, rtol=0, atol=0)
    torch.testing.assert_close(maps[-1], tokens.reshape(2, h, w, -1).permute(0, 3, 1, 2), rtol=0, atol=0)
    for i in range(3):  # norm=True touches the last stage only
        torch.testing.assert_close(maps[i], stages[i].reshape(2, *tiny.grids[i], -1).permute(0, 3, 1, 2),
                                   rtol=0, atol=0)
    for a, b in zip(plain, stages):  # NLC: the tokens, before any norm
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_indices_and_stop_early(tiny):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        every = tiny.forward_intermediates(x, intermediates_only=True)
        last_two = tiny.forward_intermediates(x, indices=2, intermediates_only=True)
        picked = tiny.forward_intermediates(x, indices=[0, -2], intermediates_only=True)
        early, maps = tiny.forward_intermediates(x, indices=[1], stop_early=True)
    for got, want in [(last_two, every[2:]), (picked, [every[0], every[2]]), (maps, [every[1]])]:
        assert len(got) == len(want)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # stop_early returns the last stage it ran (stage 2, before its patch merging, no final norm)
    assert early.shape == (1, tiny.grids[1][0] * tiny.grids[1][1], tiny.dims[1])
    with pytest.raises(ValueError, match="output_fmt"):
        tiny.forward_intermediates(x, output_fmt="NHWC")


def test_features_only_prunes_what_the_indices_do_not_need():
    """out_indices=(0, 1): stages 3-4, the patch merging after stage 2, the final norm and the head
    go; the maps equal the full model's and every parameter left is used (DDP needs that)."""
    torch.manual_seed(0)
    full = timm.create_model("mixmim_tiny", img_size=64, window_size=(8, 4, 4, 2), num_classes=5)
    torch.manual_seed(0)
    feats = timm.create_model("mixmim_tiny", img_size=64, window_size=(8, 4, 4, 2), features_only=True,
                              out_indices=(0, 1))
    encoder = feats.model
    encoder.load_state_dict({k: v for k, v in full.state_dict().items()
                             if k.startswith(("patch_embed", "absolute_pos", "layers.0.", "layers.1.blocks"))})
    assert len(encoder.layers) == 2 and encoder.layers[-1].downsample is None
    assert encoder.strides == [4, 8] and encoder.num_features == encoder.dims[-1] == 128
    assert isinstance(encoder.norm, torch.nn.Identity) and isinstance(encoder.head, torch.nn.Identity)
    assert feats.feature_info.channels() == [64, 128] and feats.feature_info.reduction() == [4, 8]
    x = torch.randn(2, 3, 64, 64)
    maps = feats(x)
    with torch.no_grad():
        want = full.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    for a, b in zip(maps, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    sum(m.square().mean() for m in maps).backward()
    unused = [n for n, p in feats.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused


@pytest.mark.parametrize("name,kwargs", [("vit_tiny_patch16_224", dict(img_size=64, out_indices=(-1,))),
                                         ("swin_tiny_patch4_window7_224", dict(img_size=128, window_size=4))])
def test_timm_families_features_only_still_work(name, kwargs):
    model = timm.create_model(name, features_only=True, pretrained=False, **kwargs)
    side = kwargs["img_size"]
    with torch.no_grad():
        maps = model(torch.randn(1, 3, side, side))
    if str(getattr(model, "output_fmt", "NCHW")).endswith("NHWC"):  # timm's Swin features are NHWC
        maps = [m.permute(0, 3, 1, 2) for m in maps]
    assert [m.shape[1] for m in maps] == model.feature_info.channels()
    assert [side // m.shape[-1] for m in maps] == model.feature_info.reduction()
