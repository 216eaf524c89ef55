"""The Swin family: the group restriction (MixMIM section 2.3) composed with Swin's shifted windows."""

from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import window_partition

import mixmim
from conftest import TINY_ENCODERS
from mixmim.models.base import resize_groups
from mixmim.models.swin import GroupSwinBlock, window_groups


def _tiny(**extra):
    return mixmim.create_encoder("swin_tiny", **dict(TINY_ENCODERS["swin_tiny"], **extra))


def _reference_block(blk: GroupSwinBlock, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """One block by the definitions, on the whole map at once: token j is a key of token i when both
    fall into the same window after the cyclic shift and hold the same group; -100 is added where
    they come from different regions of the shifted map (Swin section 3.2), the relative position
    bias is read at their offset inside the window. ``x`` (B, H, W, C), ``ids`` (B, H, W)."""
    b, h, w, c = x.shape
    ws, s = blk.window_size[0], blk.shift_size[0]
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rr, rc = ((rows - s) % h).flatten(), ((cols - s) % w).flatten()  # where the shift puts each token
    window = (rr // ws) * (w // ws) + rc // ws
    if s:
        region = ((rr >= h - ws).long() + (rr >= h - s).long()) * 3 + (rc >= w - ws).long() + (rc >= w - s).long()
    else:
        region = torch.zeros_like(window)
    dy = (rr % ws)[:, None] - (rr % ws)[None, :]
    dx = (rc % ws)[:, None] - (rc % ws)[None, :]
    attn = blk.attn
    bias = attn.relative_position_bias_table[((dy + ws - 1) * (2 * ws - 1) + dx + ws - 1)]  # (L, L, heads)
    bias = bias.permute(2, 0, 1) + torch.where(region[:, None] != region[None, :], -100.0, 0.0).to(x.dtype)
    tokens = blk.norm1(x).reshape(b, h * w, c)
    q, k, v = attn.qkv(tokens).reshape(b, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) * attn.scale + bias
    flat = ids.reshape(b, h * w)
    allowed = (window[:, None] == window[None, :]) & (flat[:, :, None] == flat[:, None, :])
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, h * w, c)
    y = x.reshape(b, h * w, c) + attn.proj(out)
    y = y + blk.mlp(blk.norm2(y))
    return y.reshape(b, h, w, c)


def test_shifted_blocks_keep_the_shift_mask_under_groups():
    """float64: stage 1 (a plain then a shifted block, window 4, shift 2) equals the definition.
    Sample 0 is one group, so only the shift mask separates its wrapped-around regions; sample 1
    mixes two groups. Dropping the shift mask, or not rolling the group map, changes the output."""
    torch.manual_seed(0)
    encoder = _tiny().double().eval()
    stage = encoder.layers[0]
    assert [blk.shift_size for blk in stage.blocks] == [(0, 0), (2, 2)]
    groups = torch.zeros(2, 4, 4, dtype=torch.long)
    groups[1] = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 1, 1], [1, 1, 0, 0]])
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    with torch.no_grad():
        tokens = encoder.embed(x, groups)
        got = encoder.forward_stages(tokens, groups, num_groups=2)[0]
        ids = resize_groups(groups, encoder.grids[0])
        ref = tokens.reshape(2, *encoder.grids[0], -1)
        for blk in stage.blocks:
            ref = _reference_block(blk, ref, ids)
    torch.testing.assert_close(got, ref.reshape(got.shape), rtol=0, atol=1e-10)


def test_group_map_rolls_with_the_tokens():
    """The group of every token of every shifted window is the group of the token that timm's block
    puts there (cyclic shift by -shift, then windows), also where windows need padding."""
    for (h, w), window, shift in [((8, 8), (4, 4), (2, 2)), ((6, 6), (4, 4), (2, 2)), ((8, 8), (4, 4), (0, 0))]:
        ids = torch.randint(0, 3, (2, h, w))
        positions = torch.arange(h * w, dtype=torch.float64).reshape(1, h, w, 1).expand(2, -1, -1, -1)
        moved = torch.roll(positions, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        pad_h, pad_w = (-h) % window[0], (-w) % window[1]
        moved = torch.nn.functional.pad(moved, (0, 0, 0, pad_w, 0, pad_h), value=-1.0)
        where = window_partition(moved, window).reshape(2, -1, window[0] * window[1]).long()  # (G, nW, N)
        expected = torch.where(where >= 0, ids.reshape(2, -1).gather(1, where.clamp(min=0).flatten(1))
                               .reshape(where.shape), -1)
        assert torch.equal(window_groups(ids, window, shift), expected), (h, w, window, shift)
    ids = torch.arange(64).reshape(1, 8, 8)
    assert window_groups(ids, (4, 4), (2, 2))[0, 0, 0] == ids[0, 2, 2]  # the first window starts at (2, 2)
    assert window_groups(ids, (4, 4), (2, 2))[0, -1, -1] == ids[0, 1, 1]  # the last one wraps around


def test_one_group_and_padded_windows_give_timm_features():
    """96 px, window 4: stage 3 (6x6) is padded to whole windows and stage 4 (3x3) is one window.
    A one-group map builds masks and still gives timm's forward_features (padding is no group)."""
    torch.manual_seed(0)
    encoder = _tiny(img_size=96).double().eval()
    assert [blk.window_size for blk in encoder.layers[3].blocks] == [(3, 3), (3, 3)]
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    groups = torch.zeros(1, 3, 3, dtype=torch.long)
    with torch.no_grad():
        expected = encoder.forward_features(x).flatten(1, 2)
        got = encoder.forward_tokens(encoder.embed(x, groups), groups)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_padded_windows_keep_images_apart():
    """96 px per-sample maps: no gradient reaches a group-0 output from group-1 pixels."""
    torch.manual_seed(0)
    encoder = _tiny(img_size=96).double().eval()
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64, requires_grad=True)
    groups = torch.tensor([[[0, 1, 0], [1, 1, 0], [0, 0, 1]], [[1, 0, 1], [0, 1, 1], [1, 0, 0]]])
    out = encoder.forward_tokens(encoder.embed(x, groups), groups, num_groups=2)
    own = resize_groups(groups, encoder.grids[-1]).reshape(2, -1, 1) == 0
    (out * torch.randn_like(out) * own).sum().backward()
    leak = x.grad.abs().sum(1)[resize_groups(groups, (96, 96)) == 1]
    assert leak.max() == 0 and x.grad.abs().max() > 0


@pytest.mark.parametrize("kind", ["shared", "per_sample"])
def test_checkpointing_and_stage_embeds(kind):
    """Grad checkpointing changes nothing; mix embeddings are added to the merged stage inputs."""
    torch.manual_seed(0)
    encoder = _tiny().eval()
    x = torch.randn(2, 3, 128, 128)
    groups = torch.randint(0, 2, (1 if kind == "shared" else 2, 4, 4))
    tokens = encoder.embed(x, groups)
    embeds = [torch.randn(2, d) for d in encoder.stage_in_dims]
    plain = encoder.forward_tokens(tokens, groups, stage_embeds=embeds)
    encoder.set_grad_checkpointing(True)
    checkpointed = encoder.forward_tokens(tokens, groups, stage_embeds=embeds)
    torch.testing.assert_close(checkpointed, plain)
    assert encoder.stage_in_dims == encoder.dims
    zero = encoder.forward_tokens(tokens, groups, stage_embeds=[torch.zeros_like(e) for e in embeds])
    assert not torch.allclose(zero, plain)
    assert encoder.config()["window_size"] == 4 and mixmim.create_encoder("swin_tiny", **encoder.config())
