"""The method contract (issue 22): every method is a PretrainMethod that answers what the loop, the
command line and the pictures ask, builds through ``build_pretrainer``/``create_pretrainer``, honours
``in_chans``, does no picture work in a training step, and refuses old checkpoints in one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mixmim
import mixmim.methods.mae as mae_module
import mixmim.methods.mixedae as mixedae_module
import mixmim.methods.mixmim as mixmim_module
import mixmim.methods.simmim as simmim_module
from conftest import TINY, TINY_DECODER, TINY_ENCODERS
from mixmim.methods.base import Picture, PretrainMethod, PretrainOutput
from mixmim.methods.factory import METHODS, build_pretrainer, method_config_class
from mixmim.models.pos_embed import sincos_2d

VIT = TINY_ENCODERS["vit_tiny"]
SETUPS = {  # method -> (model, encoder arguments, method options), all at 128 px
    "mixmim": ("mixmim_tiny", {k: v for k, v in TINY.items() if not k.startswith("decoder")}, dict(TINY_DECODER)),
    "simmim": ("swin_tiny", TINY_ENCODERS["swin_tiny"], {}),
    "mae": ("vit_tiny", VIT, dict(TINY_DECODER)),
    "mixedae": ("vit_tiny", VIT, dict(TINY_DECODER)),
}


def build(method: str, **options) -> PretrainMethod:
    model, encoder, defaults = SETUPS[method]
    extra_encoder = {k: v for k, v in options.items() if k in ("in_chans",)}
    rest = {k: v for k, v in options.items() if k not in extra_encoder}
    return build_pretrainer(method, {**defaults, **rest}, model, {**encoder, **extra_encoder})


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_answers_the_loop(method):
    model = build(method)
    assert isinstance(model, PretrainMethod) and type(model).name == method
    assert method_config_class(method) is type(model.config)
    groups, multiple = {"mixmim": (2, 1), "simmim": (1, 1), "mae": (1, 1), "mixedae": (4, 4)}[method]
    assert (model.num_groups, model.batch_multiple) == (groups, multiple)
    assert model.lr_batch(512) == 512
    assert isinstance(model.no_weight_decay(), set) and isinstance(model.no_weight_decay_keywords(), set)
    # FSDP's units: every encoder block, then every decoder block, each once.
    blocks = model.repeated_blocks()
    encoder = model.encoder
    expected = (list(encoder.blocks) if hasattr(encoder, "blocks") and isinstance(encoder.blocks, nn.Module)
                else [b for stage in encoder.layers for b in stage.blocks])
    expected += list(model.decoder.blocks) if hasattr(model, "decoder") else []
    assert [id(b) for b in blocks] == [id(b) for b in expected] and blocks


def test_the_inverse_swin_heads_blocks_are_repeated_blocks_too():
    with torch.device("meta"):
        model = mixmim.create_pretrainer("simmim", "swin_tiny", **TINY_ENCODERS["swin_tiny"], head="inverse_swin_t",
                                         head_window=4)
    head = [blk for stage in model.head.stages for blk in stage]
    assert len(head) == 12 and model.repeated_blocks()[-12:] == head


@pytest.mark.parametrize("method", list(METHODS))
def test_a_training_step_does_no_picture_work_and_a_picture_call_fills_it(method, monkeypatch):
    model = build(method).train()
    images = torch.randn(4, 3, 128, 128)

    def refuse(*args, **kwargs):
        raise AssertionError("picture work in a training step")

    for module in (mae_module, mixedae_module, mixmim_module, simmim_module):
        monkeypatch.setattr(module, "Picture", refuse)
    monkeypatch.setattr(simmim_module, "bin_colours", refuse)
    out = model(images)
    assert isinstance(out, PretrainOutput) and out.picture is None and out.loss.ndim == 0
    assert all(isinstance(v, float) for v in out.metrics.values())
    monkeypatch.undo()

    model.eval()
    with torch.no_grad():
        out = model(images, mask=out.mask, picture=True)
    p = out.picture
    assert isinstance(p, Picture) and p.inputs.shape == images.shape and p.channels == 3
    s, length = p.hidden.shape
    assert p.reconstruction.shape == (s, length, p.cell * p.cell * 3) and p.target.shape == p.reconstruction.shape
    assert p.sources.shape == (s,) and set(p.sources.tolist()) == set(range(4))
    assert p.cell == model.cell and p.norm_pix == model.norm_pix
    assert (128 // p.cell) ** 2 == length


@pytest.mark.parametrize("method", list(METHODS))
def test_one_channel_images(method):
    """``in_chans`` is honoured by every method: the decoder or head predicts patch x patch x 1 values."""
    options = dict(in_chans=1)
    if method == "simmim":
        options.update(loss="bins", num_bins=4, pixel_mean=(0.5,), pixel_std=(0.25,))
    model = build(method, **options)
    assert model.in_chans == 1
    images = torch.randn(4, 1, 128, 128)
    out = model(images)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    with torch.no_grad():
        p = model.eval()(images, picture=True).picture
    assert p.reconstruction.shape[-1] == p.cell * p.cell and p.channels == 1
    from mixmim.viz.reconstruction import reconstruction_rows

    rows = reconstruction_rows(model(images, picture=True), images, (0.5,), (0.25,))
    assert [tuple(r.shape) for r in rows] == [(4, 1, 128, 128)] * 4


def test_simmim_bins_need_one_mean_per_channel():
    with pytest.raises(ValueError, match="pixel_mean"):
        build("simmim", in_chans=1, loss="bins")


# ---------------------------------------------------------------------------------------------- factory
def test_build_pretrainer_applies_method_defaults_under_the_users_overrides():
    mae = build_pretrainer("mae", dict(TINY_DECODER), "vit_tiny", VIT)
    table = torch.cat([torch.zeros(1, 32), sincos_2d(32, 8, 8)]).unsqueeze(0)
    assert not mae.encoder.pos_embed.requires_grad and torch.equal(mae.encoder.pos_embed, table)
    learnable = build_pretrainer("mae", dict(TINY_DECODER), "vit_tiny", {**VIT, "fixed_pos_embed": False})
    assert learnable.encoder.pos_embed.requires_grad
    simmim = build_pretrainer("simmim", {}, "vit_tiny", VIT)  # SimMIM keeps timm's learnable table
    assert simmim.encoder.pos_embed.requires_grad
    # MAE's LayerNorm eps 1e-6 in the encoder and the decoder; MixMIM's decoder keeps the release's 1e-5.
    norms = [m.eps for m in mae.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and set(norms) == {1e-6}
    mixmim_norms = {m.eps for m in build("mixmim").decoder.modules() if isinstance(m, nn.LayerNorm)}
    assert mixmim_norms == {1e-5}


def test_build_and_create_give_the_same_model():
    torch.manual_seed(0)
    a = build_pretrainer("mixedae", dict(TINY_DECODER, mode="full"), "vit_tiny", VIT)
    torch.manual_seed(0)
    b = mixmim.create_pretrainer("mixedae", "vit_tiny", **VIT, **TINY_DECODER, mode="full")
    assert a.config == b.config and a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())  # same draws


def test_the_models_decoder_size_applies_unless_given():
    assert build_pretrainer("mixmim", {}, "mixmim_tiny", {}).config.decoder_dim == 256  # mixmim_tiny's decoder
    assert build_pretrainer("mixmim", {"decoder_dim": 64}, "mixmim_tiny", {}).config.decoder_dim == 64


@pytest.mark.parametrize("call,message", [
    (lambda: build_pretrainer("simmim", {"decoder_dim": 32}, "swin_tiny", {}), "decoder_dim"),
    (lambda: build_pretrainer("mae", {}, "vit_tiny", {"window_size": 7}), "window_size"),
    (lambda: build_pretrainer("byol", {}, "vit_tiny", {}), "unknown method 'byol'"),
    (lambda: build_pretrainer("mae", {}, "vit_giant", {}), "unknown model 'vit_giant'"),
])
def test_bad_names_are_one_line_errors(call, message):
    with pytest.raises((TypeError, ValueError), match=message) as info:
        call()
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("method", ["mae", "mixedae"])
def test_old_checkpoints_fail_in_one_line(method):
    """MAE and MixedAE weights mean something else since the decoder changed (class token, LayerNorm
    eps): a state without ``method_version`` is refused in one line saying why; the current state
    loads, and so does an old one given the version by hand (taking its weights as they are)."""
    model = build(method)
    state = model.state_dict()
    assert int(state["method_version"]) == 2
    model.load_state_dict(state, strict=True)
    old = {k: v for k, v in state.items() if k != "method_version"}
    with pytest.raises(ValueError) as info:
        build(method).load_state_dict(old, strict=True)
    message = str(info.value)
    assert "\n" not in message and "method_version" in message and "version 2" in message
    build(method).load_state_dict({**old, "method_version": torch.tensor(2)}, strict=True)
    with pytest.raises(ValueError, match="method_version 1"):
        build(method).load_state_dict({**old, "method_version": torch.tensor(1)}, strict=True)


def test_mixmim_checkpoints_keep_the_release_names():
    assert "method_version" not in build("mixmim").state_dict()


# ---------------------------------------------------------------------------------------------- pictures
def test_reconstruction_rows_need_a_picture_and_draw_what_the_encoder_saw():
    from mixmim.viz.reconstruction import reconstruction_rows

    model = build("mixmim").eval()
    images = torch.randn(2, 3, 128, 128)
    mask = torch.zeros(4, 4, dtype=torch.long)
    mask[:2] = 1
    with torch.no_grad():
        bare = model(images, mask=mask, picture=False)
        out = model(images, mask=mask, picture=True)
    with pytest.raises(ValueError, match="picture=True"):
        reconstruction_rows(bare, images)
    rows = reconstruction_rows(out, images, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2), True)
    torch.testing.assert_close(rows[0], (images * 0.2 + 0.5).clamp(0, 1))  # the originals, denormalised
    # The mixed row is what the encoder saw: image 0 with image 1's cells where the mask is 1.
    expected = torch.where(mask.repeat_interleave(32, 0).repeat_interleave(32, 1).bool(), images[1], images[0])
    assert torch.equal(out.picture.inputs[0], expected)
