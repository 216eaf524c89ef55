"""MixedAE (Chen et al. 2023, section 3, appendix B) on the plain ViT: symmetric mixing (eq. 2), compose and
full modes, segment embeddings, homologous TopK attention (eq. 6) and its sampling accuracy (Figure 6), the
homologous contrastive loss (eq. 7) against a hand computation, and every recipe through the loop."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import mixmim
import mixmim.methods.mixedae as mixedae_module
from conftest import TINY_DECODER, TINY_ENCODERS, tiny_run, train_two_steps
from mixmim.config import load_config
from mixmim.methods.homologous import TopK, topk_accuracy
from mixmim.methods.mixedae import MixedAE, balanced_assignment, group_size, homologous_contrastive_loss, segment_sincos
from mixmim.methods.patches import normalize_patches, patchify
from mixmim.models.vit import GroupAttention

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = dict(TINY_ENCODERS["vit_tiny"], **TINY_DECODER)  # 128 px: L = 64 patches, 16 cells of 32 px
# Four blocks: Table 3e keeps global attention in up to three.
VIT_MODEL = ["model.name=vit_tiny", "model.img_size=128", "model.options.embed_dim=32", "model.options.depth=4",
             "model.options.num_heads=2"]
VIT_DECODER = ["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_num_heads=2"]


def tiny_mixedae(**options) -> MixedAE:
    return mixmim.create_pretrainer("mixedae", "vit_tiny", **{**TINY, **options})


# ---------------------------------------------------------------------------------------------- mixing
@pytest.mark.parametrize("ratio,cell", [(0.5, 32), (0.25, 32), (0.25, 16), (0.125, 32), (0.125, 16)])
@pytest.mark.parametrize("mode", ["compose", "full"])
def test_every_image_supplies_exactly_rL_patches(ratio, cell, mode):
    model = tiny_mixedae(mixing_ratio=ratio, mask_cell=cell, mode=mode)
    k = round(1 / ratio)
    b = 2 * k
    masks = model.sample_masks(b, torch.Generator().manual_seed(0))
    assert masks.shape == ((2 if mode == "compose" else b), 8, 8)
    rl = int(ratio * 64)
    for m in masks.reshape(masks.shape[0], -1):
        assert torch.bincount(m, minlength=k).tolist() == [rl] * k  # eq. 2
    sources = model.sample_sources(masks)
    for s, row in enumerate(sources):
        group = (s if mode == "compose" else s // k)
        assert torch.bincount(row, minlength=b).tolist() == [rl if i // k == group else 0 for i in range(b)]
    # A 32-px cell is 2x2 patches of one image.
    if cell == 32:
        assert torch.equal(masks, masks[:, ::2, ::2].repeat_interleave(2, 1).repeat_interleave(2, 2))
    else:  # 16-px cells are single patches: not always 2x2 blocks
        assert not torch.equal(masks, masks[:, ::2, ::2].repeat_interleave(2, 1).repeat_interleave(2, 2))


def test_spare_cells_go_to_random_images():
    counts = torch.stack([torch.bincount(m.flatten(), minlength=4)
                          for m in balanced_assignment((7, 7), 4, 400, torch.Generator().manual_seed(0))])
    assert set(counts.sum(1).tolist()) == {49} and counts.min() == 12 and counts.max() == 13
    assert (counts == 13).float().mean(0).min() > 0.15  # no member always gets the spare cell


def test_full_mode_draws_independent_masks_for_each_sample_of_a_group():
    model = tiny_mixedae(mode="full")
    masks = model.sample_masks(4, torch.Generator().manual_seed(0)).reshape(4, -1)
    assert len({tuple(m.tolist()) for m in masks}) == 4


def test_mixed_pixels_come_from_the_group_images_at_the_same_place():
    model = tiny_mixedae()
    images = torch.randn(8, 3, 128, 128)
    masks = model.sample_masks(8, torch.Generator().manual_seed(0))
    mixed = model.mix(images, masks)
    assert mixed.shape == (2, 3, 128, 128)
    for s in range(2):
        for r in range(8):
            for c in range(8):
                image = s * 4 + int(masks[s, r, c])
                patch = (slice(None), slice(16 * r, 16 * r + 16), slice(16 * c, 16 * c + 16))
                assert torch.equal(mixed[s][patch], images[image][patch])


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.6, 1.0])
def test_mixing_ratio_must_be_one_over_an_integer_in_range(ratio):
    with pytest.raises(ValueError, match="mixing_ratio"):
        group_size(ratio)
    assert group_size(0.5) == 2 and group_size(0.25) == 4 and group_size(1 / 3) == 3


def test_batch_not_divisible_by_the_group_size_is_refused():
    model = tiny_mixedae()
    with pytest.raises(ValueError, match="not divisible by 4"):
        model(torch.randn(6, 3, 128, 128))


# ---------------------------------------------------------------------------------------------- modes
@pytest.mark.parametrize("mode,encoder_batch,sequences", [("compose", 2, 8), ("full", 8, 32)])
def test_compose_and_full_modes_give_encoder_batches_Br_and_B(mode, encoder_batch, sequences):
    model = tiny_mixedae(mode=mode)
    seen = {}
    original = model.encoder.forward_plans

    def spy(tokens, plans, layer_embed=None, **kwargs):
        seen["tokens"] = tokens.shape
        seen["layer_embed"] = layer_embed
        return original(tokens, plans, layer_embed, **kwargs)

    model.encoder.forward_plans = spy
    images = torch.randn(8, 3, 128, 128)
    result = model(images, picture=True)
    out = result.picture
    assert seen["tokens"] == (encoder_batch, 64, 32)
    assert out.reconstruction.shape == (sequences, 64, 768)
    # Every image is reconstructed from its own patches once per mixed sample of its group.
    assert torch.bincount(out.sources, minlength=8).tolist() == [sequences // 8] * 8
    assert torch.equal(out.hidden.sum(1), torch.full((sequences,), 48))
    assert out.inputs.shape == (8, 3, 128, 128) and result.mask.shape == (encoder_batch, 8, 8)
    # The segment embedding of each patch is its member's row of the table (added at every block).
    table = model.segment_table()
    torch.testing.assert_close(seen["layer_embed"], table[result.mask.reshape(encoder_batch, -1)])


def test_reconstruction_sequences_see_only_their_own_image():
    model = tiny_mixedae()
    images = torch.randn(4, 3, 128, 128)
    masks = model.sample_masks(4, torch.Generator().manual_seed(5))
    out = model(images, masks, picture=True).picture
    members = masks.reshape(1, -1)
    for t in range(4):
        assert torch.equal(~out.hidden[t], members[0] == t) and int(out.sources[t]) == t


# ---------------------------------------------------------------------------------------------- segments
@pytest.mark.parametrize("kind", ["sincos", "learnable"])
def test_segment_embeddings_differ_by_image(kind):
    model = tiny_mixedae(segment_embed=kind)
    table = model.segment_table()
    assert table.shape == (4, 32)
    distances = torch.cdist(table, table) + torch.eye(4)
    assert distances.min() > 1e-3
    assert (kind == "learnable") == any(p is table for p in model.parameters())
    images = torch.randn(4, 3, 128, 128)
    masks = model.sample_masks(4, torch.Generator().manual_seed(0))
    relabelled = (masks + 1) % 4  # same mixed pixels' layout, other member ids per patch
    a, _ = model.encode(model.mix(images, masks), masks)
    b, _ = model.encode(model.mix(images, masks), relabelled)
    assert not torch.allclose(a, b)


def test_sincos_segments_are_the_1d_encoding_of_the_member_index():
    table = segment_sincos(3, 8)
    assert torch.equal(table[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    torch.testing.assert_close(table[2, 0], torch.tensor(math.sin(2.0)))
    torch.testing.assert_close(table[1, 5], torch.tensor(math.cos(1.0 / 10000 ** 0.25)))


def test_without_segment_embeddings_member_ids_change_nothing():
    model = tiny_mixedae(segment_embed="none", measure_topk=False).eval()
    images = torch.randn(4, 3, 128, 128)
    masks = model.sample_masks(4, torch.Generator().manual_seed(0))
    a, _ = model.encode(model.mix(images, masks), masks)
    b, _ = model.encode(model.mix(images, masks), (masks + 1) % 4)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------- TopK
def _probe_attention(n: int, scores_from: torch.Tensor | None = None) -> GroupAttention:
    """One head whose output is its attention matrix: inputs are one-hot rows of width n, v = x and the
    projection is the identity; q and k are random (or ``scores_from`` (n, n) for q, identity for k)."""
    attn = GroupAttention(n, num_heads=1, qkv_bias=False)
    with torch.no_grad():
        q = torch.randn(n, n) if scores_from is None else scores_from
        k = torch.randn(n, n) if scores_from is None else torch.eye(n)
        attn.qkv.weight.copy_(torch.cat([q, k, torch.eye(n)]))
        attn.proj.weight.copy_(torch.eye(n))
        attn.proj.bias.zero_()
    return attn


def test_topk_attention_keeps_exactly_k_keys_per_query_and_none_keeps_all():
    n = 13
    attn = _probe_attention(n)
    x = torch.eye(n).expand(2, n, n)
    for k in (1, 4, 12):
        weights = attn(x, attn_mask=TopK(k))
        assert ((weights > 0).sum(-1) == k).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, n))
    # Ties keep exactly K as well (all scores equal).
    flat = _probe_attention(n, scores_from=torch.zeros(n, n))
    assert ((flat(x, attn_mask=TopK(5)) > 0).sum(-1) == 5).all()
    assert ((attn(x, attn_mask=None) > 0).sum(-1) == n).all()
    # Eq. 6: the kept weights are the softmax over the K largest scores.
    scores = (x[0] @ attn.qkv.weight[:n].T) @ (x[0] @ attn.qkv.weight[n:2 * n].T).T * attn.scale
    top, index = scores.topk(4, dim=-1)
    expected = torch.zeros(n, n).scatter(-1, index, top.softmax(-1))
    torch.testing.assert_close(attn(x, attn_mask=TopK(4))[0], expected)


def test_first_block_keeps_global_attention_and_the_others_keep_rL_keys():
    model = tiny_mixedae(depth=3)
    plans = model.attention_plans()
    assert plans[0] is None and [p.k for p in plans[1:]] == [16, 16]  # K = 0.25 x 64
    assert all(isinstance(p, TopK) for p in tiny_mixedae(depth=3, global_layers=0).attention_plans())
    assert tiny_mixedae(depth=3, global_layers=2).attention_plans()[:2] == [None, None]
    assert [p.k for p in tiny_mixedae(depth=3, topk_ratio=0.125).attention_plans()[1:]] == [8, 8]
    assert tiny_mixedae(depth=3, topk_ratio=1.0).attention_plans() == [None] * 3  # "no sampling"
    assert tiny_mixedae(depth=3, attention="global").attention_plans() == [None] * 3


def test_attention_never_reads_which_image_a_patch_is_from():
    attn = _probe_attention(9)
    x = torch.randn(2, 9, 9)
    plain = attn(x, attn_mask=TopK(3))
    told = attn(x, attn_mask=TopK(3, sources=torch.randint(0, 2, (2, 8))))
    lied = attn(x, attn_mask=TopK(3, sources=torch.randint(0, 2, (2, 8))))
    assert torch.equal(plain, told) and torch.equal(plain, lied)


def test_topk_accuracy_by_hand():
    # Two queries of images 0 and 1 (and a class token, id -1); K = 2 kept keys each.
    sources = torch.tensor([[-1, 0, 1, 0]])
    index = torch.tensor([[[[0, 1], [1, 3], [2, 0], [3, 2]]]])  # (B=1, H=1, N=4, K=2)
    # query 1 (image 0): keys 1, 3 -> 2/2; query 2 (image 1): keys 2, 0 -> 1/2; query 3: keys 3, 2 -> 1/2.
    assert topk_accuracy(index, sources).item() == pytest.approx((1 + 0.5 + 0.5) / 3)


def test_topk_accuracy_is_one_when_attention_can_only_find_its_own_image():
    # Attention level: q = k = 10 x one-hot(image); the class token is zero. Each image has K patches.
    n_img, per = 3, 4
    ids = torch.arange(n_img).repeat_interleave(per)[torch.randperm(n_img * per)]
    x = torch.zeros(1, 1 + n_img * per, 16)
    x[0, 1 + torch.arange(n_img * per), ids] = 10.0
    attn = GroupAttention(16, num_heads=1, qkv_bias=False)
    with torch.no_grad():
        attn.qkv.weight.copy_(torch.cat([torch.eye(16), torch.eye(16), torch.randn(16, 16)]))
    plan = TopK(per, sources=ids[None])
    attn(x, attn_mask=plan)
    assert plan.accuracy.item() == 1.0
    # With wrong labels the same kept keys (each patch's own image) score by hand: for a query q the
    # share of its image's patches that carry q's wrong label.
    labels = ids[torch.randperm(len(ids))]
    shuffled = TopK(per, sources=labels[None])
    attn(x, attn_mask=shuffled)
    by_hand = sum(float((labels[ids == ids[q]] == labels[q]).float().mean()) for q in range(len(ids))) / len(ids)
    assert shuffled.accuracy.item() == pytest.approx(by_hand, rel=1e-6)


def test_topk_accuracy_metric_of_the_method():
    # End to end: learnable segment embeddings so large that, after LayerNorm, the second block's
    # queries and keys (identity projections) are the segment pattern; K = rL = 16 own patches.
    model = tiny_mixedae(segment_embed="learnable", xavier_init=False).eval()
    with torch.no_grad():
        table = torch.zeros(4, 32)
        for t in range(4):
            table[t, [t, 16 + t]] = 1000.0  # one coordinate in each head
        model.segment_embed.copy_(table)
        model.encoder.cls_token.zero_()
        model.encoder.pos_embed.zero_()
        qkv = model.encoder.blocks[1].attn.qkv
        qkv.weight[:64].copy_(torch.cat([torch.eye(32), torch.eye(32)]))
        qkv.bias.zero_()
    out = model(torch.randn(8, 3, 128, 128))
    assert out.metrics["topk_acc_layer2"] == 1.0
    assert "topk_acc_layer1" not in out.metrics  # the first block attends globally


# ---------------------------------------------------------------------------------------------- contrastive
@pytest.mark.parametrize("images,per_image", [(2, 2), (4, 3)])
@pytest.mark.parametrize("positives", ["separate", "mean"])
def test_contrastive_loss_by_hand_when_images_are_orthogonal(images, per_image, positives):
    """Homologous features equal, heterologous ones orthogonal: cos = 1 with the m - 1 positives and
    0 with the (k - 1) m others, so every term of eq. 7 is -log(e^{1/tau} / ((m-1) e^{1/tau} + (k-1) m));
    with the mean positive (cos 1) against the heterologous patches, -log(e^{1/tau} / (e^{1/tau} + (k-1) m)).
    Among features whose images are not anti-correlated this is the minimum: moving homologous
    features apart, or giving different images something in common, raises the loss."""
    tau, width = 0.25, 4
    ids = torch.arange(images).repeat_interleave(per_image)[torch.randperm(images * per_image)][None]
    # Image g owns the coordinates [g * width, (g + 1) * width); its patches all point along the first.
    features = torch.zeros(1, images * per_image, images * width)
    features[0, torch.arange(images * per_image), ids[0] * width] = 3.0  # the scale does not matter
    same_image = (per_image - 1) if positives == "separate" else 1
    expected = math.log(same_image + (images - 1) * per_image * math.exp(-1 / tau))
    loss = homologous_contrastive_loss(features, ids, tau, positives)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    g = torch.Generator().manual_seed(0)
    own_block = torch.zeros_like(features, dtype=torch.bool)
    for i, image in enumerate(ids[0].tolist()):
        own_block[0, i, image * width:(image + 1) * width] = True
    apart = features + torch.where(own_block, torch.randn(features.shape, generator=g), 0.0)  # still orthogonal
    shared = features + 1.0  # a common component: heterologous cosines above 0
    random = torch.randn(features.shape, generator=g)
    for other in (apart, shared, random):
        assert homologous_contrastive_loss(other, ids, tau, positives) > loss + 1e-4


def test_contrastive_loss_contrasts_within_each_mixed_sample_only():
    ids = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    features = torch.randn(2, 4, 8)
    both = homologous_contrastive_loss(features, ids)
    one = homologous_contrastive_loss(features[:1], ids[:1])
    two = homologous_contrastive_loss(features[1:], ids[1:])
    assert both.item() == pytest.approx((one.item() + two.item()) / 2, rel=1e-6)


def test_total_loss_is_reconstruction_plus_a_tenth_of_contrastive():
    model = tiny_mixedae().eval()
    out = model(torch.randn(4, 3, 128, 128))
    assert out.loss.item() == pytest.approx(out.metrics["recon_loss"] + 0.1 * out.metrics["contrastive_loss"],
                                            rel=1e-5)
    assert model.projector.out_features == 128


# ---------------------------------------------------------------------------------------------- formulas by hand
def _expected_sources(s: int, k: int, per_group: int) -> torch.Tensor:
    """Sequence ``j * k + t`` reconstructs member t of mixed sample j, i.e. batch image
    ``(j // per_group) * k + t`` (compose: one sample per group; full: k samples per group)."""
    return torch.tensor([(j // per_group) * k + t for j in range(s) for t in range(k)])


@pytest.mark.parametrize("mode", ["compose", "full"])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_reconstruction_loss_by_hand(mode, norm_pix):
    """Eq. 4 written out: every sequence is scored against its own image's (normalised) patches on
    the positions its image did not supply, each patch's squared error averaged over its values, the
    sum divided by the number of scored patches. The expected sources, hidden positions and targets
    are computed here from the mask alone, not read from the method."""
    model = tiny_mixedae(mode=mode, norm_pix_loss=norm_pix).eval()
    images = torch.randn(8, 3, 128, 128)
    masks = model.sample_masks(8, torch.Generator().manual_seed(3))
    out = model(images, masks, picture=True)
    k, s = 4, masks.shape[0]
    sources = _expected_sources(s, k, 1 if mode == "compose" else k)
    members = masks.reshape(s, -1).repeat_interleave(k, dim=0)
    hidden = members != torch.arange(k).repeat(s)[:, None]
    patches = patchify(images, 16)
    target = (normalize_patches(patches) if norm_pix else patches)[sources]
    errors = (out.picture.reconstruction - target).pow(2).mean(dim=-1)
    by_hand = errors[hidden].sum() / hidden.sum()
    assert out.metrics["recon_loss"] == pytest.approx(by_hand.item(), rel=1e-5)
    assert torch.equal(out.picture.sources, sources) and torch.equal(out.picture.hidden, hidden)


def test_loss_reads_the_hidden_patches_of_the_right_image_only(monkeypatch):
    """Changing a target where its image supplied the patch leaves the loss as it is; changing it
    where the patch was hidden moves it."""
    model = tiny_mixedae(contrastive_weight=0.0).eval()
    images = torch.randn(4, 3, 128, 128)
    masks = model.sample_masks(4, torch.Generator().manual_seed(4))
    base = model(images, masks).loss
    real = mixedae_module.patch_targets
    supplied = masks.reshape(1, -1) == torch.arange(4)[:, None]  # (image, L): image i supplied the patch

    def changed(where):
        def targets(pixels, patch, norm_pix):
            out = real(pixels, patch, norm_pix).clone()
            out[where] += 3.0
            return out
        return targets

    monkeypatch.setattr(mixedae_module, "patch_targets", changed(supplied))
    assert model(images, masks).loss.item() == pytest.approx(base.item(), abs=1e-6)
    monkeypatch.setattr(mixedae_module, "patch_targets", changed(~supplied))
    assert model(images, masks).loss.item() > base.item() + 1.0


def test_each_decoder_sequence_sees_only_its_images_features(monkeypatch):
    """Eq. 3: sequence j * k + t keeps the encoder features where member t supplied the patch and the
    [MASK] token elsewhere: the decoder is told so, and features elsewhere change nothing."""
    model = tiny_mixedae().eval()
    images = torch.randn(4, 3, 128, 128)
    masks = model.sample_masks(4, torch.Generator().manual_seed(6))
    seen = {}
    real = model.decoder.forward
    monkeypatch.setattr(model.decoder, "forward",
                        lambda tokens, visible=None, prefix=None: (seen.update(tokens=tokens, visible=visible,
                                                                               prefix=prefix),
                                                                   real(tokens, visible, prefix))[1])
    model(images, masks)
    expected = masks.reshape(1, -1) == torch.arange(4)[:, None]
    assert seen["visible"] is not None and torch.equal(seen["visible"], expected)
    assert seen["prefix"] is None  # decoder_cls_token is off by default
    garbage = torch.where(expected.unsqueeze(-1), seen["tokens"], torch.randn_like(seen["tokens"]) * 100)
    with torch.no_grad():
        torch.testing.assert_close(real(garbage, expected), real(seen["tokens"], expected))


def test_decoder_class_token_switch(monkeypatch):
    """``decoder_cls_token=True`` hands every sequence of a mixed sample the sample's encoded class
    token (MAE's decoder path); the default gives none."""
    model = tiny_mixedae(decoder_cls_token=True).eval()
    images = torch.randn(8, 3, 128, 128)
    masks = model.sample_masks(8, torch.Generator().manual_seed(7))
    seen = {}
    real = model.decoder.forward
    monkeypatch.setattr(model.decoder, "forward", lambda tokens, visible=None, prefix=None: (
        seen.update(prefix=prefix), real(tokens, visible, prefix))[1])
    model(images, masks)
    encoded, _ = model.encode(model.mix(images, masks), masks)
    cls = model.encoder.final_norm(encoded)[:, :1]  # (2 samples, 1, C)
    torch.testing.assert_close(seen["prefix"], cls.repeat_interleave(4, dim=0))
    with pytest.raises(ValueError, match="decoder_cls_token"):
        tiny_mixedae(decoder_cls_token=True, attention="masked", segment_embed="none")


@pytest.mark.parametrize("accumulate", [True, False])
def test_segment_embedding_reaches_every_block(accumulate):
    """Appendix B: "added to the input of each Transformer layer". Block i's input is block i-1's
    output plus the member's segment embedding (accumulating in the residual stream), or, with
    ``segment_embed_accumulate=False``, block i reads its input plus the embedding and the stream
    keeps only the block's update."""
    model = tiny_mixedae(depth=3, segment_embed="learnable", segment_embed_accumulate=accumulate).eval()
    images = torch.randn(4, 3, 128, 128)
    masks = model.sample_masks(4, torch.Generator().manual_seed(8))
    ins, outs = [], []
    blocks = model.encoder.blocks
    hooks = [blk.register_forward_pre_hook(lambda m, args: ins.append(args[0].detach())) for blk in blocks]
    hooks += [blk.register_forward_hook(lambda m, args, out: outs.append(out.detach())) for blk in blocks]
    model.encode(model.mix(images, masks), masks)
    for h in hooks:
        h.remove()
    segments = model.segment_table().detach()[masks.reshape(1, -1)]  # (1, L, C), the patches only
    enc = model.encoder
    start = torch.cat([enc.cls_token + enc.pos_embed[:, :1],
                       enc.patch_embed(model.mix(images, masks)) + enc.pos_embed[:, 1:]], dim=1).detach()
    torch.testing.assert_close(ins[0][:, 1:] - start[:, 1:], segments.expand(1, -1, -1), rtol=0, atol=1e-5)
    torch.testing.assert_close(ins[0][:, :1], start[:, :1])  # the class token gets none
    for i in (1, 2):
        added = ins[i] - (outs[i - 1] if accumulate else outs[i - 1] - segments_padded(segments))
        torch.testing.assert_close(added[:, 1:], segments, rtol=0, atol=1e-4)
        torch.testing.assert_close(added[:, :1], torch.zeros_like(added[:, :1]), rtol=0, atol=1e-5)


def segments_padded(segments: torch.Tensor) -> torch.Tensor:
    """The embedding over [class token, patches], zero for the class token."""
    return torch.cat([torch.zeros_like(segments[:, :1]), segments], dim=1)


@pytest.mark.parametrize("where", ["post_norm", "pre_norm"])
def test_projector_reads_the_features_table_3b_asks_for(where, monkeypatch):
    """Table 3b: the contrastive loss reads the encoder's patch features after (default) or before
    its final LayerNorm, through the projector, and eq. 7 runs once per mixed sample (the call gets
    (S, L, D) features and the (S, L) member ids)."""
    model = tiny_mixedae(contrastive_features=where).eval()
    images = torch.randn(8, 3, 128, 128)
    masks = model.sample_masks(8, torch.Generator().manual_seed(9))
    seen = {}
    hook = model.projector.register_forward_pre_hook(lambda m, args: seen.__setitem__("input", args[0].detach()))
    real = mixedae_module.homologous_contrastive_loss
    monkeypatch.setattr(mixedae_module, "homologous_contrastive_loss",
                        lambda f, ids, *a, **kw: (seen.update(features=f, ids=ids), real(f, ids, *a, **kw))[1])
    out = model(images, masks)
    hook.remove()
    encoded, _ = model.encode(model.mix(images, masks), masks)
    pre = encoded[:, 1:]
    expected = pre if where == "pre_norm" else model.encoder.final_norm(pre)
    torch.testing.assert_close(seen["input"], expected.detach())
    assert seen["features"].shape == (2, 64, 128) and torch.equal(seen["ids"], masks.reshape(2, -1))
    by_hand = real(model.projector(expected), masks.reshape(2, -1), 0.25, "separate")
    assert out.metrics["contrastive_loss"] == pytest.approx(by_hand.item(), rel=1e-5)


def test_xavier_initialisation_of_the_encoder():
    """Appendix B: xavier-uniform linear layers (and the patch projection as a linear layer), zero
    biases; without it the ViT keeps timm's init (std 0.02)."""
    import math as m

    for xavier in (True, False):
        enc = tiny_mixedae(xavier_init=xavier).encoder
        layers = [mod for mod in enc.modules() if isinstance(mod, nn.Linear)]
        weights = [(lin.weight, lin.in_features, lin.out_features) for lin in layers]
        proj = enc.patch_embed.proj.weight
        weights.append((proj.reshape(proj.shape[0], -1), proj[0].numel(), proj.shape[0]))
        for weight, fan_in, fan_out in weights:
            bound = m.sqrt(6 / (fan_in + fan_out))
            if xavier:
                assert weight.abs().max() <= bound
                assert weight.std().item() == pytest.approx(bound / m.sqrt(3), rel=0.2)
            else:
                assert weight.std().item() < 0.5 * bound / m.sqrt(3)
        if xavier:
            assert all(bool((lin.bias == 0).all()) for lin in layers if lin.bias is not None)


def _contrastive_by_loops(z, ids, tau, positives):
    """Eq. 7 (and Table 3c's mean positive) written with loops over one mixed sample."""
    z = torch.nn.functional.normalize(z.double(), dim=-1)
    n = len(ids)
    cos = z @ z.T
    terms = []
    for q in range(n):
        same = [j for j in range(n) if ids[j] == ids[q] and j != q]
        if not same:
            continue
        others = [j for j in range(n) if j != q]
        if positives == "separate":
            denominator = sum(math.exp(cos[q, j] / tau) for j in others)
            terms.append(sum(-math.log(math.exp(cos[q, p] / tau) / denominator) for p in same) / len(same))
        else:
            centre = torch.nn.functional.normalize(z[[q] + same].mean(0), dim=0)  # the query and its homologues
            positive = math.exp(float(z[q] @ centre) / tau)
            heterologous = sum(math.exp(cos[q, j] / tau) for j in range(n) if ids[j] != ids[q])
            terms.append(-math.log(positive / (positive + heterologous)))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("positives", ["separate", "mean"])
def test_contrastive_loss_by_loops_on_random_features(positives):
    g = torch.Generator().manual_seed(11)
    ids = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 1, 0])
    z = torch.randn(1, 10, 5, generator=g)
    loss = homologous_contrastive_loss(z, ids[None], 0.25, positives)
    assert loss.item() == pytest.approx(_contrastive_by_loops(z[0], ids.tolist(), 0.25, positives), rel=1e-5)


def test_lr_batch_counts_images_or_encoder_samples():
    """Section 4.1: lr = base_lr x bs / 256 with "batch size 4096 for compose, 1024 for full". The
    default counts images; ``lr_batch="samples"`` counts the mixed samples the encoder sees."""
    assert tiny_mixedae().lr_batch(4096) == 4096
    assert tiny_mixedae(lr_batch="samples").lr_batch(4096) == 1024  # compose: B r
    assert tiny_mixedae(lr_batch="samples", mode="full").lr_batch(1024) == 1024  # full: B
    assert tiny_mixedae(lr_batch="samples", mixing_ratio=0.5).lr_batch(4096) == 2048


# ---------------------------------------------------------------------------------------------- ablations
@pytest.mark.parametrize("options", [
    dict(attention="global", segment_embed="none", contrastive_weight=0.0),
    dict(attention="masked", segment_embed="none", contrastive_weight=0.0),
    dict(contrastive_features="pre_norm", contrastive_positives="mean"),
    dict(segment_embed_every_layer=False, segment_embed="learnable"),
    dict(reconstruction_weight=0.0),
    dict(mixing_ratio=0.5, mode="full"),
], ids=["naive", "masked", "pre_ln_mean", "input_segments", "contrastive_only", "pairs_full"])
def test_ablations_train(options, tmp_path):
    train_two_steps(tmp_path, method=tiny_mixedae(**options))


def test_naive_mixing_has_no_recognition_parts():
    model = tiny_mixedae(attention="global", segment_embed="none", contrastive_weight=0.0)
    assert model.segment_table() is None and model.projector is None
    out = model(torch.randn(4, 3, 128, 128))
    assert set(out.metrics) == {"recon_loss"} and out.loss.item() == pytest.approx(out.metrics["recon_loss"])


def test_masked_attention_keeps_images_apart():
    model = tiny_mixedae(attention="masked", segment_embed="none", contrastive_weight=0.0).double().eval()
    images = torch.randn(4, 3, 128, 128, dtype=torch.float64)
    masks = model.sample_masks(4, torch.Generator().manual_seed(0))
    mixed = model.mix(images, masks).requires_grad_(True)
    features, _ = model.encode(mixed, masks)
    own = masks.reshape(-1) == 0
    features[0, own].sum().backward()
    pixels_of_others = (masks != 0).repeat_interleave(16, 1).repeat_interleave(16, 2)[:, None].expand_as(mixed)
    assert mixed.grad[pixels_of_others].abs().max() == 0


@pytest.mark.parametrize("options,message", [
    (dict(attention="masked"), "segment_embed"),
    (dict(topk_ratio=1.5), "topk_ratio"),
    (dict(contrastive_weight=0.0, reconstruction_weight=0.0), "nothing to train"),
    (dict(mask_cell=24), "mask_cell"),
    (dict(global_layers=3), "global_layers"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        tiny_mixedae(**options)


def test_weight_decay_follows_mae_code():
    from mixmim.training.optim import no_weight_decay_names

    assert no_weight_decay_names(tiny_mixedae(segment_embed="learnable")) == set()


def test_two_training_steps(tmp_path):
    model = train_two_steps(tmp_path, method=tiny_mixedae())
    assert isinstance(model.projector, nn.Linear)


# ---------------------------------------------------------------------------------------------- recipes
RECIPES = sorted((CONFIGS / "mixedae").glob("*.yaml"))
# A row that is the same run as an earlier one is that row's file (docs/mae_mixedae.md): Table 3f "none",
# 7a "naive" and 7b "recon only" are table3a_ratio_025; 3c "separate" and 3f "HomoCon" are
# table3b_contrastive_post_ln; 3f "both", 7b "both" and 7c "mixing + segment embeddings" are table3e_global_1st.
TABLE_ROWS = {"table3a_ratio_025", "table3a_ratio_050", "table3b_contrastive_pre_ln", "table3b_contrastive_post_ln",
              "table3c_positives_mean", "table3d_topk_0125", "table3d_topk_025",
              "table3d_topk_050", "table3d_topk_100", "table3e_global_none", "table3e_global_1st",
              "table3e_global_1st_2nd", "table3e_global_1st_2nd_3rd", "table3f_homoatt",
              "table7a_mae", "table7a_masked_attention", "table7b_homocon_only", "table7c_no_segment_embed"}
MAIN = {"mixedae_vit_base_300ep", "mixedae_vit_base_800ep", "mixedae_vit_base_1600ep", "mixedae_vit_base_300ep_full",
        "mixedae_vit_base_300ep_full_light", "mixedae_vit_large_1600ep"}


def test_there_is_a_recipe_per_table_row():
    assert {p.stem for p in RECIPES} == TABLE_ROWS | MAIN


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_has_paper_values_and_trains_two_tiny_steps(path, tmp_path):
    paper = load_config(path)
    large = "_large_" in path.stem  # appendix C: ViT-L with ViT-B's recipe at batch 2048
    assert paper.model.name == ("vit_large" if large else "vit_base") and paper.model.img_size == 224
    assert paper.model.options == {"fixed_pos_embed": True}
    assert paper.optim.weight_decay == 0.05 and paper.optim.betas == (0.9, 0.95) and paper.optim.warmup_epochs == 40
    options = paper.method_options()
    if path.stem in MAIN:
        full = options["mode"] == "full"
        assert paper.optim.base_lr == 7.5e-5 and paper.train.batch_size == (1024 if full else 2048 if large else 4096)
        assert paper.train.epochs == int(path.stem.split("_")[3][:-2])
    else:
        assert paper.optim.base_lr == 1.5e-4 and paper.train.batch_size == 4096 and paper.train.epochs == 300
        assert paper.method_name() == "mae" or options["mode"] == "compose"
    cfg = load_config(path, VIT_MODEL + VIT_DECODER)
    model = mixmim.create_pretrainer(cfg.method_name(), cfg.model.name, **cfg.model.encoder_overrides(),
                                     **cfg.method_options())
    train_two_steps(tmp_path, cfg, method=model)
    for key, value in options.items():
        if not key.startswith("decoder"):
            assert getattr(model.config, key) == value, key


@pytest.mark.parametrize("stem,expected", [
    ("mixedae_vit_base_300ep", dict(attention="homologous", global_layers=1, contrastive_weight=0.1,
                                    segment_embed="sincos", mixing_ratio=0.25)),
    ("table3a_ratio_050", dict(attention="global", segment_embed="none", contrastive_weight=0.0, mixing_ratio=0.5)),
    ("table3d_topk_0125", dict(topk_ratio=0.125, global_layers=0)),
    ("table3e_global_1st_2nd", dict(global_layers=2, topk_ratio=None)),
    ("table3f_homoatt", dict(attention="homologous", contrastive_weight=0.0)),
    ("table3b_contrastive_post_ln", dict(attention="global", contrastive_weight=0.1)),  # Table 3f "HomoCon"
    ("table7a_masked_attention", dict(attention="masked", segment_embed="none")),
    ("table7b_homocon_only", dict(reconstruction_weight=0.0)),
    ("table7c_no_segment_embed", dict(segment_embed="none", attention="homologous")),
])
def test_recipes_say_what_their_row_changes(stem, expected):
    options = load_config(CONFIGS / "mixedae" / f"{stem}.yaml").method_options()
    assert {k: options[k] for k in expected} == expected


# ---------------------------------------------------------------------------------------------- the loop
@pytest.fixture(scope="module")
def mixedae_run(tmp_path_factory):
    from mixmim.training.pretrain import run_pretraining

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("mixedae_run")
        overrides = [o for o in tiny_run(root, "method.name=mixedae") if not o.startswith("model.")]
        overrides += ["model.name=vit_tiny", "model.img_size=128",
                      "model.options={embed_dim: 32, depth: 2, num_heads: 2}", "train.max_steps=3"]
        summary = run_pretraining(load_config(None, overrides))
    finally:
        torch.set_num_threads(threads)
    return Path(summary["run_dir"]), summary


def test_pretrain_run_logs_topk_accuracy_and_writes_everything(mixedae_run):
    import csv

    run_dir, summary = mixedae_run
    assert summary["step"] == 3 and summary["stopped"] is None
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["step_00000003.pt"]
    for name in ("reconstruction.png", "encoder.safetensors", "encoder.json"):
        assert (run_dir / name).is_file(), name
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3
    assert {"recon_loss", "contrastive_loss", "topk_acc_layer2"} <= set(rows[0])
    assert all(math.isfinite(float(r["topk_acc_layer2"])) for r in rows)  # logged every step


def test_transfer_commands_accept_the_run_folder(mixedae_run, tmp_path):
    import json

    from mixmim.cli import main
    from test_mae import _class_folder

    run_dir, _ = mixedae_run
    data = _class_folder(tmp_path / "classes")
    common = ["--checkpoint", str(run_dir), "--data", str(data), "--num-workers", "0", "--no-progress",
              "--val-fraction", "0.34", "--batch-size", "4"]
    assert main(["knn", *common, "--output", str(tmp_path / "knn")]) == 0
    assert main(["linprobe", *common, "--output", str(tmp_path / "lp"), "--epochs", "1"]) == 0
    assert main(["finetune", *common, "--output", str(tmp_path / "ft"), "--epochs", "1", "--warmup-epochs", "0"]) == 0
    for out in ("knn", "lp", "ft"):
        assert 0.0 <= json.loads((tmp_path / out / "results.json").read_text())["acc1"] <= 100.0


def test_batch_not_divisible_into_groups_is_refused_before_any_work():
    from mixmim.config import ConfigError, load_config

    args = ["model.name=vit_tiny", "model.img_size=128", "model.window_size=null",
            "model.options={embed_dim: 32, depth: 2, num_heads: 2}", "method.name=mixedae", "train.batch_size=6"]
    with pytest.raises(ConfigError, match="multiple of 4"):
        load_config(None, args)
