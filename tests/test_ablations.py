"""Each ablation switch of MixMIM (Tables 6-10) and MixMAE (supplement Tables 3-6) checked by the
property that defines it."""

import pytest
import torch
import torch.nn.functional as F

import mixmim
from conftest import TINY
from mixmim.methods.masking import block_groups, random_groups
from mixmim.methods.mixmim import MixMIMConfig
from mixmim.models.base import resize_groups

B = 4


def build(**options):
    return mixmim.create_pretrainer("mixmim", "mixmim_base", **{**TINY, **options})


def capture_encoder_input(model, monkeypatch):
    """Record the stage-1 tokens the encoder is given (and the kwargs it runs with)."""
    seen = {}
    original = model.encoder.forward_tokens

    def spy(x, groups=None, **kwargs):
        seen.update(x=x.detach().clone(), groups=groups, kwargs=kwargs)
        return original(x, groups, **kwargs)

    monkeypatch.setattr(model.encoder, "forward_tokens", spy)
    return seen


def hidden_tokens(model, mask):
    """(1, L1) bool: stage-1 tokens of the group-1 (hidden) cells."""
    return model.encoder.stage_groups(mask, 0).reshape(mask.shape[0], -1) == 1


# ---------------------------------------------------------------------------------- Table 6: filling
def test_zero_filling_feeds_zero_tokens_to_hidden_cells(monkeypatch):
    model = build(filling="zero")
    seen = capture_encoder_input(model, monkeypatch)
    images = torch.randn(B, 3, 128, 128)
    mask = random_groups(model.grid, 0.5)
    out = model(images, mask=mask, picture=True).picture
    hid = hidden_tokens(model, mask)[0]
    assert (seen["x"][:, hid] == 0).all()
    torch.testing.assert_close(seen["x"][:, ~hid], model.encoder.patch_embed(images)[:, ~hid])
    # One image per sample: plain attention, one reconstruction per image, scored on filled cells.
    assert seen["groups"] is None
    assert out.reconstruction.shape[0] == B and out.sources.tolist() == list(range(B))
    assert torch.equal(out.hidden, (mask.reshape(1, -1) == 1).expand(B, -1))
    # The picture shows the filled cells as the data mean (0) and the rest as they are.
    shown = (resize_groups(mask, (128, 128)) == 1).unsqueeze(1).expand_as(images)
    assert (out.inputs[shown] == 0).all() and torch.equal(out.inputs[~shown], images[~shown])


def test_learnable_filling_uses_the_one_shared_token(monkeypatch):
    model = build(filling="learnable")
    seen = capture_encoder_input(model, monkeypatch)
    mask = random_groups(model.grid, 0.5)
    out = model(torch.randn(B, 3, 128, 128), mask=mask)
    hid = hidden_tokens(model, mask)[0]
    filled = seen["x"][:, hid]
    assert torch.equal(filled, model.mask_token.detach().expand_as(filled))
    out.loss.backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert not hasattr(build(), "mask_token"), "the default model keeps the release's parameter names"


def test_shuffle_keeps_the_multiset_of_each_images_hidden_tokens(monkeypatch):
    """The encoder's input for a shuffled image is the patch embedding of its shuffled pixels. A patch
    embedding computed at another position can differ from the same patch's embedding in
    ``patch_embed(images)`` by float rounding (~1e-6 on some CPUs: the kernel's blocking depends on the
    position), so tokens are matched with a tolerance; whole-cell moves are checked exactly on the
    pixels the encoder embedded."""
    model = build(filling="shuffle")
    seen = capture_encoder_input(model, monkeypatch)
    pixels_seen = {}
    real_embed = model.encoder.embed
    def embed(x, groups=None):
        pixels_seen["x"] = x.detach().clone()
        return real_embed(x, groups)

    monkeypatch.setattr(model.encoder, "embed", embed)
    images = torch.randn(B, 3, 128, 128)
    mask = random_groups(model.grid, 0.5)
    model(images, mask=mask)
    tokens = model.encoder.patch_embed(images).detach()
    hid = hidden_tokens(model, mask)[0]
    for i in range(B):
        given, own = seen["x"][i, hid], tokens[i, hid]
        # Same multiset: every given token is close to one of the image's own hidden tokens and the
        # pairing is one to one.
        distance = torch.cdist(given, own, compute_mode="donot_use_mm_for_euclid_dist")
        assert distance.min(dim=1).values.max() < 1e-4
        assert len(set(distance.argmin(dim=1).tolist())) == len(given)
        # Shown cells: same pixels, but the shuffled pixels are a channels-last view, so the conv may
        # pick another kernel (~1e-6 apart after the LayerNorm); another patch is O(1) away.
        torch.testing.assert_close(seen["x"][i, ~hid], tokens[i, ~hid], rtol=1e-5, atol=1e-5)
    # Whole cells move: each hidden cell of the input is, pixel for pixel (copies: exact), some hidden
    # cell of the same image.
    rows = lambda x: x.permute(0, 2, 3, 1).reshape(B, 128 * 128, 3)  # noqa: E731
    cells_in, cells_own = model._cells(rows(pixels_seen["x"])), model._cells(rows(images))
    hidden_cells = (mask.flatten() == 1).nonzero().flatten()
    for i in range(B):
        for cell in hidden_cells:
            assert any(torch.equal(cells_in[i, cell], cells_own[i, other]) for other in hidden_cells)


def test_shuffle_moves_every_hidden_cell():
    """Section 5 "randomly shuffles the masked tokens": no hidden cell may keep its own content (a
    fixed point would show the cell while it is scored as hidden)."""
    model = build(filling="shuffle")
    tokens = torch.randn(B, 32 * 32, 16)  # distinct content in every cell
    for seed in range(20):
        mask = random_groups(model.grid, 0.5, count=B, generator=torch.Generator().manual_seed(seed))
        moved = model._cells(model.shuffle_cells(tokens, mask, torch.Generator().manual_seed(seed)))
        own = model._cells(tokens)
        hidden = mask.flatten(1) == 1
        for i in range(B):
            assert torch.equal(moved[i, ~hidden[i]], own[i, ~hidden[i]])
            for cell in hidden[i].nonzero().flatten():
                assert not torch.equal(moved[i, cell], own[i, cell]), (seed, i, int(cell))


def test_derangement_is_uniform_over_derangements():
    from mixmim.methods.mixmim import derangement

    generator = torch.Generator().manual_seed(0)
    seen = {}
    for _ in range(3000):
        perm = tuple(derangement(4, generator).tolist())
        assert all(p != i for i, p in enumerate(perm))
        seen[perm] = seen.get(perm, 0) + 1
    assert len(seen) == 9  # the 9 derangements of 4 elements, each about 1/9 of the draws
    assert min(seen.values()) > 3000 / 9 * 0.8
    assert derangement(1).tolist() == [0]


def test_zoomin_fills_from_a_resized_crop_of_the_same_image(monkeypatch):
    model = build(filling="zoomin", zoomin_factor=2.0)
    tops, lefts = torch.tensor([0, 64, 10, 33]), torch.tensor([64, 0, 50, 7])
    monkeypatch.setattr(model, "zoom_boxes", lambda batch, generator=None: (tops, lefts, 64, 64))
    seen = capture_encoder_input(model, monkeypatch)
    images = torch.randn(B, 3, 128, 128)
    mask = random_groups(model.grid, 0.5)
    model(images, mask=mask)
    hid = hidden_tokens(model, mask)[0]
    for i in range(B):
        t, left = int(tops[i]), int(lefts[i])
        crop = images[i:i + 1, :, t:t + 64, left:left + 64]
        zoomed = F.interpolate(crop, size=(128, 128), mode="bilinear", align_corners=False)
        expected = model.encoder.patch_embed(zoomed)[0]
        # One image here, the whole batch in the model (interpolation and patch embedding): equal up to
        # rounding; another crop is O(1) away.
        torch.testing.assert_close(seen["x"][i, hid], expected[hid], rtol=1e-5, atol=1e-5)


def test_zoom_boxes_are_a_zoom_in_of_the_image():
    model = build(filling="zoomin", zoomin_factor=4.0)
    tops, lefts, ch, cw = model.zoom_boxes(50, torch.Generator().manual_seed(0))
    assert (ch, cw) == (32, 32)
    assert tops.min() >= 0 and tops.max() <= 96 and lefts.max() <= 96


# --------------------------------------------------------------------------------- Table 7: single
def test_single_reconstruction_decodes_only_B_sequences_of_each_own_image():
    model = build(dual_reconstruction=False)
    mask = random_groups(model.grid, 0.5)
    out = model(torch.randn(B, 3, 128, 128), mask=mask, picture=True).picture
    assert out.reconstruction.shape[0] == B
    assert out.sources.tolist() == list(range(B))
    # Image i is rebuilt from its own (group-0) cells and scored on the cells its partner filled.
    assert torch.equal(out.hidden, (mask.reshape(1, -1) == 1).expand(B, -1))
    dual = build()
    dual.load_state_dict(model.state_dict())
    full = dual(torch.randn(B, 3, 128, 128), mask=mask, picture=True)
    assert full.picture.reconstruction.shape[0] == 2 * B


# -------------------------------------------------------------------------------- Table 10: pretext
def cross_group_gradient(model, groups):
    """|d(sum of group-0 outputs) / d(group-1 inputs)| through the whole encoder."""
    enc = model.encoder
    x = torch.randn(2, enc.grids[0][0] * enc.grids[0][1], enc.embed_dim, requires_grad=True)
    latent = model.encode(x, groups)
    last = groups.reshape(groups.shape[0], -1)
    # A random read-out: the plain sum of LayerNorm outputs is a constant with no gradient.
    (latent[:, last[0] == 0] * torch.randn(latent.shape[-1])).sum().backward()
    first = enc.stage_groups(groups, 0).reshape(-1)
    return x.grad[:, first != 0].abs().sum(), x.grad[:, first == 0].abs().sum()


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_masked_attention_keeps_cross_group_gradient_exactly_zero(impl):
    model = build(attention_impl=impl)
    groups = random_groups(model.grid, 0.5)
    across, within = cross_group_gradient(model, groups)
    assert across == 0 and within > 0


@pytest.mark.parametrize("pretext", ["none", "mix_embedding"])
def test_none_and_mix_embedding_let_attention_cross(pretext):
    model = build(pretext=pretext)
    groups = random_groups(model.grid, 0.5)
    across, within = cross_group_gradient(model, groups)
    assert across > 0 and within > 0


def test_none_adds_no_embeddings_and_no_parameters():
    plain, default = build(pretext="none"), build()
    assert set(plain.state_dict()) == set(default.state_dict())
    plain.load_state_dict(default.state_dict())
    x = torch.randn(2, 32 * 32, 16)
    groups = random_groups(plain.grid, 0.5)
    torch.testing.assert_close(plain.encode(x, groups), default.encoder.forward_tokens(x, None))


def test_mix_embedding_adds_one_vector_per_group_at_the_start_of_each_stage():
    model = build(pretext="mix_embedding")
    enc = model.encoder
    assert len(model.mix_embed) == 4 and all(e.shape == (2, d) for e, d in zip(model.mix_embed, enc.dims))
    groups = random_groups(model.grid, 0.5)
    x = torch.randn(2, 32 * 32, 16)
    before, after = {}, {}
    # Stage input before the embedding: patch tokens + positions, or the previous patch merging.
    for s, stage in enumerate(enc.layers):
        stage.register_forward_pre_hook(lambda m, args, s=s: after.__setitem__(s, args[0].detach()))
        if stage.downsample is not None:
            stage.downsample.register_forward_hook(lambda m, a, out, s=s: before.__setitem__(s + 1, out.detach()))
    before[0] = x + enc.absolute_pos_embed
    model.encode(x, groups)
    for s in range(4):
        ids = enc.stage_groups(groups, s).reshape(-1)
        added = after[s] - before[s]
        table = model.mix_embed[s].detach()
        assert not torch.allclose(table[0], table[1])
        for g in (0, 1):
            torch.testing.assert_close(added[:, ids == g], table[g].expand_as(added[:, ids == g]),
                                       rtol=1e-5, atol=1e-5)


def test_mix_embedding_is_trained():
    model = build(pretext="mix_embedding")
    model(torch.randn(B, 3, 128, 128)).loss.backward()
    assert all(e.grad is not None and e.grad.abs().sum() > 0 for e in model.mix_embed)


# ----------------------------------------------------------------------- supplement Table 4: k-way
@pytest.mark.parametrize("k", [3, 4, 5])
def test_k_way_mixing_uses_every_cell_of_every_image_exactly_once(k, monkeypatch):
    model = build(num_images=k)
    images = torch.randn(6, 3, 128, 128)
    seen = capture_encoder_input(model, monkeypatch)
    result = model(images, picture=True)
    groups, out = result.mask, result.picture
    counts = torch.stack([(groups == g).sum() for g in range(k)])
    assert counts.sum() == 16 and counts.max() - counts.min() <= 1
    # Which image each input cell came from: compare input cells with each image's cells.
    tokens = model._cells(model.encoder.patch_embed(images).detach())
    given = model._cells(seen["x"])
    used = torch.zeros(6, 16, dtype=torch.long)
    for i in range(6):
        for cell in range(16):
            # Same position, same patches: equal up to the patch embedding's rounding; another
            # image's cell is O(1) away.
            sources = [j for j in range(6) if torch.allclose(given[i, cell], tokens[j, cell], atol=1e-5)]
            assert len(sources) == 1
            used[sources[0], cell] += 1
    assert (used == 1).all()
    # k-way unmixing: k*B decoded rows, each image scored on the (k-1)/k cells it did not show.
    assert out.reconstruction.shape[0] == k * 6
    assert torch.equal(out.hidden.sum(1), 16 - counts.repeat_interleave(6))


@pytest.mark.parametrize("k", [3, 5])
def test_k_way_attention_never_crosses_any_two_images(k):
    model = build(num_images=k)
    enc = model.encoder
    groups = random_groups(model.grid, num_groups=k)
    first = enc.stage_groups(groups, 0).reshape(-1)
    last = groups.reshape(-1)
    for a in range(k):
        x = torch.randn(1, first.numel(), enc.embed_dim, requires_grad=True)
        (model.encode(x, groups)[:, last == a] * torch.randn(enc.num_features)).sum().backward()
        for b_ in range(k):
            grad = x.grad[:, first == b_].abs().sum()
            assert (grad > 0) if a == b_ else (grad == 0), (a, b_)


def test_two_images_with_mask_token_split_25_25_50(monkeypatch):
    model = build(mask_token_ratio=0.5)
    groups, tokens_at = model.sample_layout(B)
    flat, tok = groups.reshape(-1), tokens_at.reshape(-1)
    assert int((~tok & (flat == 0)).sum()) == 4 and int((~tok & (flat == 1)).sum()) == 4 and int(tok.sum()) == 8
    seen = capture_encoder_input(model, monkeypatch)
    images = torch.randn(B, 3, 128, 128)
    out = model(images, mask=groups, token_mask=tokens_at, picture=True).picture
    at = model.encoder.stage_groups(tokens_at, 0).reshape(-1)
    assert torch.equal(seen["x"][:, at], model.mask_token.detach().expand(B, int(at.sum()), -1))
    # Each image keeps 25% of the cells and is scored on the other 75% (the table's ratio 0.75).
    assert out.reconstruction.shape[0] == 2 * B
    assert (out.hidden.sum(1) == 12).all()
    own = torch.cat([(flat == 0) & ~tok, (flat == 1) & ~tok]).reshape(2, 1, -1).expand(2, B, -1).reshape(2 * B, -1)
    assert torch.equal(out.hidden, ~own)


# ------------------------------------------------------------------------------- Table 8: masking
def components(mask):
    """Number of 4-connected components of the True cells of a 2D bool tensor."""
    seen, count = set(), 0
    cells = {tuple(c) for c in mask.nonzero().tolist()}
    for start in cells:
        if start in seen:
            continue
        count += 1
        stack = [start]
        while stack:
            r, c = stack.pop()
            if (r, c) in seen or (r, c) not in cells:
                continue
            seen.add((r, c))
            stack += [(r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)]
    return count


def test_block_masking_makes_connected_blocks_with_the_exact_count():
    gen = torch.Generator().manual_seed(0)
    blocks = block_groups((14, 14), 0.5, count=40, generator=gen)
    randoms = random_groups((14, 14), 0.5, count=40, generator=gen)
    assert (blocks.flatten(1).sum(1) == 98).all()
    mean_blocks = sum(components(m.bool()) for m in blocks) / 40
    mean_random = sum(components(m.bool()) for m in randoms) / 40
    assert mean_blocks < 6 < 15 < mean_random


def test_block_masking_through_the_model():
    model = build(mask_type="block", mask_per_sample=True)
    masks = model.sample_mask(B)
    assert masks.shape == (B, 4, 4) and (masks.flatten(1).sum(1) == 8).all()


@pytest.mark.parametrize("low,high", [(0.4, 0.6), (0.3, 0.7), (0.2, 0.8)])
@pytest.mark.parametrize("mask_type", ["random", "block"])
def test_ratio_range_draws_within_bounds(low, high, mask_type):
    model = build(mask_ratio_range=(low, high), mask_type=mask_type, mask_per_sample=True)
    counts = model.sample_mask(200).flatten(1).sum(1)
    assert counts.min() >= int(16 * low) and counts.max() <= int(16 * high)
    assert len(counts.unique()) >= 3


def test_mask_per_sample_or_shared():
    assert build().sample_mask(B).shape == (1, 4, 4)
    per = build(mask_per_sample=True).sample_mask(8)
    assert per.shape == (8, 4, 4) and len({tuple(m.flatten().tolist()) for m in per}) > 1


def test_mask_cell_64_masks_2x2_blocks_of_last_stage_cells():
    model = build(mask_cell=64, mask_per_sample=True)
    for mask in model.sample_mask(20):
        blocks = mask.reshape(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(4, 4)
        assert (blocks == blocks[:, :1]).all()
        assert int(mask.sum()) == 8
    model(torch.randn(2, 3, 128, 128)).loss.backward()


@pytest.mark.parametrize("cell", [16, 48])
def test_mask_cell_not_a_multiple_of_the_stride_is_a_clear_error(cell):
    with pytest.raises(ValueError, match=f"mask_cell={cell} is not a multiple of the encoder stride 32"):
        build(mask_cell=cell)


# -------------------------------------------------------------------- positions and target
def test_learnable_positional_embedding_is_trained():
    fixed, learned = build(), build(learnable_pos_embed=True)
    assert not fixed.encoder.absolute_pos_embed.requires_grad
    learned(torch.randn(2, 3, 128, 128)).loss.backward()
    assert learned.encoder.absolute_pos_embed.grad.abs().sum() > 0


def test_norm_pix_target_switch():
    images = torch.rand(2, 3, 128, 128)
    raw = build(norm_pix_loss=False)(images, picture=True).picture.target
    normed = build()(images, picture=True).picture.target
    from mixmim.methods.patches import normalize_patches

    torch.testing.assert_close(normed, normalize_patches(raw))


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize("options,text", [
    (dict(filling="noise"), "filling='noise'"),
    (dict(pretext="cutmix"), "pretext='cutmix'"),
    (dict(mask_token_ratio=1.0), "mask_token_ratio=1.0"),
    (dict(mask_cell=0), "mask_cell=0"),
    (dict(filling="zero", num_images=3), "num_images=3"),
    (dict(filling="shuffle", pretext="mix_embedding"), "filling='shuffle'"),
    (dict(mask_type="block", num_images=3), "num_images=3"),
    (dict(mask_ratio_range=(0.3, 0.7), num_images=4), "num_images=4"),
    (dict(zoomin_factor=0.5), "zoomin_factor=0.5"),
    (dict(mask_ratio=0.3, num_images=3), "mask_ratio=0.3 has no meaning with num_images=3"),
])
def test_invalid_switches_are_one_line_errors(options, text):
    with pytest.raises(ValueError) as info:
        MixMIMConfig(**options).validate()
    assert text in str(info.value) and "\n" not in str(info.value)
