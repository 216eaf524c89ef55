"""PVT v2 specifics of keeping mixed images apart (MixMIM section 2.3 and supplement section 9): every
spatial-reduction key lies in one group, and each of the three restrictions (mixed depth-wise conv,
mixed overlapping patch embedding, restricted attention) is needed."""

from __future__ import annotations

import pytest
import torch
from timm.models.pvt_v2 import MlpWithDepthwiseConv

from conftest import TINY_ENCODERS
from mixmim.methods.masking import random_groups
from mixmim.models import pvt
from mixmim.models.base import resize_groups
from mixmim.models.pvt import GroupedSRAttention, MixedMlp, PVTv2Encoder

TINY = dict(TINY_ENCODERS["pvt_v2_b2"])


def _tiny(**extra) -> PVTv2Encoder:
    return PVTv2Encoder(**dict(TINY, **extra)).double().eval()


def _groups(k: int = 2, count: int = 1, grid=(4, 4), seed: int = 0) -> torch.Tensor:
    return random_groups(grid, 0.5, num_groups=k, count=count, generator=torch.Generator().manual_seed(seed))


def _leak(out: torch.Tensor, out_ids: torch.Tensor, x: torch.Tensor, in_ids: torch.Tensor, k: int) -> float:
    """Largest gradient that outputs of one group (sample 0) receive from inputs of another group."""
    weights = torch.randn_like(out)
    worst = 0.0
    for g in range(k):
        x.grad = None
        (out[0] * weights[0] * (out_ids[0] == g).unsqueeze(-1)).sum().backward(retain_graph=True)
        grad = x.grad[0].abs()
        grad = grad.sum(0).flatten() if x.ndim == 4 else grad.sum(-1)  # per pixel or per token
        worst = max(worst, float(grad[in_ids[0] != g].max()))
    return worst


def test_a_reduced_key_never_covers_two_groups():
    """Differentiate every reduced key (``sr`` conv + norm of the real modules) with respect to the
    stage's tokens: the tokens it reads all hold one group, the one the attention mask gives it, and
    that reduced map is the last stage's map (each key = one 32-pixel cell)."""
    torch.manual_seed(0)
    encoder = _tiny()
    groups = _groups(k=4)
    for stage in range(encoder.num_stages):
        attn = encoder.stages[stage].blocks[0].attn
        grid = encoder.grids[stage]
        tokens = torch.randn(1, grid[0] * grid[1], encoder.dims[stage], dtype=torch.float64, requires_grad=True)
        reduced = attn.reduce(tokens, grid)
        assert encoder.reduced_grid(stage) == encoder.grids[-1]
        key_groups = resize_groups(groups, encoder.reduced_grid(stage)).flatten()
        assert torch.equal(key_groups, resize_groups(groups, encoder.grids[-1]).flatten())
        token_groups = resize_groups(groups, grid).flatten()
        readout = torch.randn_like(reduced)  # a plain sum of a LayerNorm output is constant
        for r in range(reduced.shape[1]):
            (grad,) = torch.autograd.grad((reduced[0, r] * readout[0, r]).sum(), tokens, retain_graph=True)
            read = token_groups[grad[0].abs().sum(-1) > 0].unique().tolist()
            assert read == [int(key_groups[r])], (stage, r, read)
        mask = encoder._attention_mask(groups, stage)
        assert mask.any(-1).all(), "every query keeps its own cell's key"


RESTRICTIONS = {
    # drop one restriction at a time (timm's plain forward in its place): each must then leak
    "depthwise_conv": (MixedMlp, "forward", lambda self, x, feat_size, groups=None, num_groups=None:
                       MlpWithDepthwiseConv.forward(self, x, feat_size)),
    "attention": (GroupedSRAttention, "forward", lambda self, x, feat_size, attn_mask=None:
                  pvt.Attention.forward(self, x, feat_size)),
    "patch_embedding": (PVTv2Encoder, "_downsample", staticmethod(
        lambda embed, x, groups, num_groups: embed.norm(embed.proj(x).permute(0, 2, 3, 1)).flatten(1, 2))),
}


@pytest.mark.parametrize("dropped", list(RESTRICTIONS))
def test_every_restriction_is_needed(dropped, monkeypatch):
    """Stage-2 outputs from stage-1 tokens (float64): with all restrictions no gradient crosses groups;
    leaving any one of them out (an unmixed depth-wise conv, say) makes it cross."""
    torch.manual_seed(0)
    encoder = _tiny()
    groups = _groups(k=2)
    h, w = encoder.grids[0]
    tokens = torch.randn(1, h * w, encoder.embed_dim, dtype=torch.float64, requires_grad=True)
    in_ids = resize_groups(groups, encoder.grids[0]).flatten(1)
    out_ids = resize_groups(groups, encoder.grids[1]).flatten(1)

    def leak() -> float:
        return _leak(encoder.forward_stages(tokens, groups, num_groups=2)[1], out_ids, tokens, in_ids, 2)

    assert leak() == 0
    owner, name, plain = RESTRICTIONS[dropped]
    monkeypatch.setattr(owner, name, plain)
    assert leak() > 0, f"without the mixed/restricted {dropped} images should mix"


def test_embed_keeps_fine_mask_cells_apart_and_runs_without_groups_after():
    """SimMIM's use: ``embed`` with a mask of 4-pixel cells (finer than the 32-pixel limit of the
    attention) is a mixed convolution; ``forward_tokens`` then runs without groups."""
    torch.manual_seed(0)
    encoder = _tiny()
    mask = _groups(k=2, count=2, grid=(32, 32))
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64, requires_grad=True)
    tokens = encoder.embed(x, mask)
    pixels = resize_groups(mask, (128, 128)).flatten(1)
    assert _leak(tokens, resize_groups(mask, encoder.grids[0]).flatten(1), x, pixels, 2) == 0
    assert encoder.forward_tokens(tokens).shape == (2, 16, encoder.num_features)
    with pytest.raises(ValueError, match="multiples of 32 pixels"):
        encoder.forward_tokens(tokens, mask)


def test_without_groups_it_is_timms_forward():
    torch.manual_seed(0)
    encoder = PVTv2Encoder(**TINY).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ours = encoder.forward_tokens(encoder.embed(x))
        timm_features = encoder.forward_features(x).flatten(2).transpose(1, 2)
        one_group = encoder.forward_tokens(encoder.embed(x, torch.zeros(1, 4, 4, dtype=torch.long)),
                                           torch.zeros(1, 4, 4, dtype=torch.long))
    assert torch.equal(ours, timm_features)
    torch.testing.assert_close(one_group, ours, rtol=1e-4, atol=1e-4)


def test_linear_attention_exact_at_224_refused_otherwise():
    """PVT v2-li pools keys to 7x7: at 224 pixels each pooled window is one 32-pixel cell (exact);
    at 128 pixels windows straddle cells and groups are refused."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="linear=True"):
        _tiny(linear=True).forward_tokens(torch.zeros(1, 32 * 32, 16, dtype=torch.float64), _groups())
    encoder = _tiny(linear=True, img_size=224, depths=(1, 1, 1, 1))
    groups = _groups(k=2, grid=(7, 7))
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64, requires_grad=True)
    out = encoder.forward_tokens(encoder.embed(x, groups), groups, num_groups=2)
    assert _leak(out, groups.flatten(1), x, resize_groups(groups, (224, 224)).flatten(1), 2) == 0


def test_grad_checkpointing_and_mix_embeddings():
    torch.manual_seed(0)
    encoder = _tiny()
    groups = _groups(k=2, count=2)
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    tables = [torch.randn(2, d, dtype=torch.float64, requires_grad=True) for d in encoder.stage_in_dims]

    def run():
        out = encoder.forward_tokens(encoder.embed(x, groups), groups)
        mixed = encoder.forward_tokens(encoder.embed(x), groups, restrict_attention=False, stage_embeds=tables)
        (out.square().sum() + mixed.square().sum()).backward()
        return out.detach(), [p.grad.clone() for p in encoder.parameters()], [t.grad.clone() for t in tables]

    plain = run()
    encoder.zero_grad()
    for t in tables:
        t.grad = None
    encoder.set_grad_checkpointing(True)
    again = run()
    torch.testing.assert_close(again[0], plain[0])
    for a, b in zip(again[1] + again[2], plain[1] + plain[2]):
        torch.testing.assert_close(a, b)
    assert all(t.abs().sum() > 0 for t in plain[2]), "every stage's mix embedding is used"


def test_config_rebuilds_the_encoder():
    encoder = PVTv2Encoder(**TINY)
    again = PVTv2Encoder(**encoder.config())
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in encoder.state_dict().items()}
    assert (encoder.strides, encoder.grids, encoder.dims) == ([4, 8, 16, 32], [(32, 32), (16, 16), (8, 8), (4, 4)],
                                                              [16, 32, 40, 64])
    assert encoder.stage_in_dims == encoder.dims and encoder.embed_dim == 16 and encoder.stride == 32
