"""Layer-wise lr decay groups of the encoder (MixMIM section 8, Table 12)."""

import pytest
import torch

from conftest import TINY_ENCODER
from mixmim.evaluation.layer_decay import create_optimizer, layer_ids, param_groups
from mixmim.models.mixmim_vit import MixMIMTransformer


def _classifier(**kw):
    return MixMIMTransformer(**{**TINY_ENCODER, "num_classes": 5, "learnable_pos_embed": True, **kw})


def test_layer_ids_follow_blocks_with_patch_merging_in_next_stage():
    model = _classifier()
    ids = layer_ids(model)
    total = sum(model.depths)  # 5 blocks -> layers 1..5, head layer 6
    assert ids["patch_embed.proj.weight"] == 0 and ids["absolute_pos_embed"] == 0
    assert ids["layers.0.blocks.0.attn.qkv.weight"] == 1
    assert ids["layers.1.blocks.0.attn.qkv.weight"] == 2
    assert ids["layers.2.blocks.1.mlp.fc1.weight"] == 4
    # The patch merging after stage i is counted with the first block of stage i + 1.
    assert ids["layers.0.downsample.reduction.weight"] == ids["layers.1.blocks.0.norm1.weight"] == 2
    assert ids["layers.2.downsample.norm.weight"] == ids["layers.3.blocks.0.attn.proj.weight"] == 5
    # The final norm and the head share the last block's layer (release: get_layer_id_for_mixmim).
    assert ids["norm.weight"] == ids["head.weight"] == ids["layers.3.blocks.0.mlp.fc1.weight"] == total


def test_scales_first_layer_smallest_head_one_decay_and_no_decay_rules():
    model = _classifier()
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.7)
    scale_of, decay_of = {}, {}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            scale_of[names[id(p)]] = g["lr_scale"]
            decay_of[names[id(p)]] = g["weight_decay"]
    total = sum(model.depths) + 1
    assert scale_of["head.weight"] == pytest.approx(0.7) and scale_of["norm.weight"] == pytest.approx(0.7)
    assert scale_of["patch_embed.proj.weight"] == pytest.approx(0.7**total)
    assert min(scale_of.values()) == scale_of["patch_embed.proj.weight"]
    assert scale_of["layers.0.downsample.reduction.weight"] == scale_of["layers.1.blocks.0.mlp.fc2.weight"]
    assert scale_of["layers.1.blocks.0.mlp.fc2.weight"] == pytest.approx(0.7 ** (total - 2))
    # Weight decay: every matrix, the relative position tables and a learnable position table too
    # (the release's fine-tuning model declares nothing); norms and biases no.
    for name in ("layers.0.blocks.0.attn.qkv.weight", "layers.0.blocks.0.attn.relative_position_bias_table",
                 "absolute_pos_embed"):
        assert decay_of[name] == 0.05, name
    for name in ("layers.0.blocks.0.norm1.weight", "layers.0.blocks.0.attn.qkv.bias", "head.bias"):
        assert decay_of[name] == 0.0, name


def test_optimizer_from_timm_factory_steps_with_scaled_lrs():
    model = _classifier(learnable_pos_embed=False)
    opt = create_optimizer(model, lr=1e-3, layer_decay=0.7)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.999)
    # Fixed sine-cosine positions are not optimised at all.
    assert all(p is not model.absolute_pos_embed for g in opt.param_groups for p in g["params"])
    loss = model(torch.randn(2, 3, 128, 128)).sum()
    loss.backward()
    opt.step()
    coarse = model.group_matcher(coarse=True)
    assert coarse("layers.0.downsample.reduction.weight") == coarse("layers.1.blocks.0.norm1.weight")


def test_bad_decay_is_rejected():
    with pytest.raises(ValueError, match="layer_decay=1.5"):
        param_groups(_classifier(), layer_decay=1.5)


def _scales(model, **kw):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr_scale"] for g in param_groups(model, **kw) for p in g["params"]}


def test_simmims_rule_on_swin_counts_merging_with_the_stage_before_and_keeps_the_head_at_full_rate():
    """SimMIM's get_swin_layer: patch embedding layer 0, block j of stage i layer sum(depths[:i]) + j + 1,
    the patch merging that opens stage i the layer of stage i-1's last block, everything else (final
    norm, head) the last layer, scale decay ** (count - 1 - id) with count = sum(depths) + 2."""
    from conftest import TINY_ENCODERS
    from mixmim.models.registry import create_classifier

    model = create_classifier("swin_tiny", num_classes=3, **TINY_ENCODERS["swin_tiny"])
    scale = _scales(model, weight_decay=0.05, layer_decay=0.5, rule="simmim")
    count = 2 + 2 + 2 + 2 + 2  # 8 blocks + embedding + last
    assert scale["head.fc.weight"] == scale["norm.weight"] == 1.0
    assert scale["patch_embed.proj.weight"] == pytest.approx(0.5 ** (count - 1))
    assert scale["layers.0.blocks.1.mlp.fc1.weight"] == pytest.approx(0.5 ** (count - 1 - 2))
    assert scale["layers.1.downsample.reduction.weight"] == scale["layers.0.blocks.1.mlp.fc1.weight"]
    assert scale["layers.1.blocks.0.attn.qkv.weight"] == pytest.approx(0.5 ** (count - 1 - 3))
