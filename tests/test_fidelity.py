"""What a user trains matches the public release where the golden forward pass cannot tell: weight
decay groups, layer-wise lr decay, initialisation and defaults (Sense-X/MixMIM main_pretrain.py,
util/lr_decay.py, models_mixmim.py)."""

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import mixmim
from conftest import TINY, TINY_ENCODER
from mixmim.config import OptimConfig, TrainConfig
from mixmim.evaluation.layer_decay import param_groups
from mixmim.models.mixmim_vit import MixMIMTransformer
from mixmim.training.optim import build_optimizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _no_decay_names(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}


def _release_rule(model):
    """timm's ``add_weight_decay`` with no skip list: 1-d parameters and biases, trainable ones only."""
    return {n for n, p in model.named_parameters() if p.requires_grad and (p.ndim == 1 or n.endswith(".bias"))}


@pytest.mark.parametrize("options", [{}, {"pretext": "mix_embedding"}, {"filling": "learnable"}])
def test_pretraining_weight_decay_spares_only_1d_parameters_as_the_release(options):
    model = mixmim.create_pretrainer("mixmim", "mixmim_tiny", **TINY, **options)
    optimizer = build_optimizer(model, OptimConfig(), 256, torch.device("cpu"))
    no_decay = _no_decay_names(model, optimizer.param_groups)
    assert no_decay == _release_rule(model)
    decayed = {n for n, p in model.named_parameters() if p.requires_grad} - no_decay
    assert "decoder.mask_token" in decayed
    assert "encoder.layers.0.blocks.0.attn.relative_position_bias_table" in decayed


def test_simmim_keeps_its_own_exclusions():
    model = mixmim.create_pretrainer("simmim", "mixmim_tiny", **TINY_ENCODER)
    optimizer = build_optimizer(model, OptimConfig(), 256, torch.device("cpu"))
    no_decay = _no_decay_names(model, optimizer.param_groups)
    tables = {n for n, _ in model.named_parameters() if n.endswith("relative_position_bias_table")}
    assert no_decay == _release_rule(model) | {"mask_token"} | tables


def test_classifier_weight_decay_spares_only_1d_parameters_as_the_release():
    model = MixMIMTransformer(**TINY_ENCODER, num_classes=5)
    assert _no_decay_names(model, param_groups(model, 0.05, 0.7)) == _release_rule(model)


def _release_layer_id(name: str, depths: list[int]) -> int:
    """util/lr_decay.py's get_layer_id_for_mixmim, restated."""
    if name in ("cls_token", "pos_embed", "absolute_pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("layers"):
        stage = int(name.split(".")[1])
        if "downsample" in name:
            return sum(depths[: stage + 1]) + 1
        return sum(depths[:stage]) + int(name.split(".")[3]) + 1
    return sum(depths)


def test_layer_decay_scales_equal_the_release_rule_for_every_parameter_of_base():
    with torch.device("meta"):
        model = mixmim.create_classifier("mixmim_base", num_classes=1000, learnable_pos_embed=True)
    decay = 0.7
    total_layers = sum(model.depths) + 1
    scale_of = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in param_groups(model, 0.05, decay):
        for p in g["params"]:
            scale_of[names[id(p)]] = g["lr_scale"]
    assert set(scale_of) == set(names.values())
    for name, scale in scale_of.items():
        expected = decay ** (total_layers - _release_layer_id(name, model.depths))
        assert scale == pytest.approx(expected, rel=1e-12), name
    assert scale_of["head.weight"] == pytest.approx(decay) and max(scale_of.values()) < 1.0


def test_patch_embedding_keeps_pytorch_default_init():
    torch.manual_seed(3)
    encoder = MixMIMTransformer(**TINY_ENCODER)
    torch.manual_seed(3)
    reference = nn.Conv2d(3, TINY_ENCODER["embed_dim"], 4, 4)  # the first module the encoder builds
    assert torch.equal(encoder.patch_embed.proj.weight, reference.weight)
    assert torch.equal(encoder.patch_embed.proj.bias, reference.bias)


def test_decoder_mask_token_drawn_by_truncated_normal(monkeypatch):
    import mixmim.models.decoder as decoder_module

    calls = []
    real = decoder_module.trunc_normal_

    def record(tensor, *args, **kwargs):
        calls.append((tensor, kwargs))
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(decoder_module, "trunc_normal_", record)
    model = mixmim.create_pretrainer("mixmim", "mixmim_tiny", **TINY)
    assert any(t is model.decoder.mask_token and kw.get("std") == 0.02 for t, kw in calls)


def test_default_epochs_and_every_recipe_states_its_epochs():
    assert TrainConfig().epochs == 600  # the papers' headline recipe (85.1% with MixMIM-B)
    # Study profiles and arms are fragments merged by `mixmim study` (its budget is in images), not recipes.
    recipes = sorted(p for p in CONFIGS.rglob("*.yaml") if "study" not in p.relative_to(CONFIGS).parts)
    assert recipes
    from mixmim.config import read_recipe

    for path in recipes:
        if "segment" in path.relative_to(CONFIGS).parts:  # iteration schedules (16k, 80k, 160k): max_steps
            assert isinstance(read_recipe(path).get("train", {}).get("max_steps"), int), path
            continue
        tree = yaml.safe_load(path.read_text())
        assert isinstance(tree.get("train", {}).get("epochs"), int), path


def test_reconstruction_picture_says_what_it_borrows_and_can_draw_the_raw_prediction(tmp_path):
    """With the normalised-pixel target the default picture takes each hidden cell's mean and variance
    from the original (MAE's visualisation): brightening a hidden cell of the original brightens the
    drawn reconstruction although the model's output is the same. The raw picture does not move."""
    from mixmim.viz.reconstruction import BORROWED_NOTE, picture_note, reconstruction_rows, save_reconstruction_grid

    model = mixmim.create_pretrainer("mixmim", "mixmim_tiny", **TINY).eval()
    images = torch.randn(2, 3, 128, 128) * 0.3
    mask = torch.zeros(4, 4, dtype=torch.long)
    mask[0, 0] = 1  # image 0's cell (0, 0) is hidden from it and drawn from its prediction
    with torch.no_grad():
        out = model(images, mask=mask, picture=True)
    brighter = images.clone()
    brighter[0, :, :32, :32] += 1.0
    for raw in (False, True):
        before = reconstruction_rows(out, images, raw=raw)[2][0, :, :32, :32]
        after = reconstruction_rows(out, brighter, raw=raw)[2][0, :, :32, :32]
        # The same picture tensors drawn twice: exact when the images are not read (raw).
        assert torch.equal(before, after) == raw
    assert picture_note(True, False) == BORROWED_NOTE and picture_note(False, False) is None
    path = save_reconstruction_grid(reconstruction_rows(out, images), tmp_path / "r.png",
                                    title="t", note=BORROWED_NOTE)
    assert path.stat().st_size > 1000
