"""Numerical equivalence with the public release (shared/reference/golden_tiny_s0.pt)."""

import pytest
import torch

import mixmim

# Tolerances at the precision this code reaches on the CPU (loss 0, reconstruction 1.1e-6, logits
# 1.5e-7 at the time of writing) with a small margin: a change such as the decoder's LayerNorm eps
# 1e-5 -> 1e-6 (reconstruction error 5e-6) fails them.
LOSS_RTOL, RECON_ATOL, LOGITS_ATOL = 2e-7, 2e-6, 4e-7


def _pretrainer(golden, impl="fast"):
    cfg = dict(golden["config"])
    model = mixmim.create_pretrainer("mixmim", "mixmim_base", attention_impl=impl, **cfg)
    model.load_state_dict(mixmim.convert_official(golden["pretrain_state_dict"]), strict=True)
    return model.eval()


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_golden_loss_reconstruction_and_logits(golden, impl):
    cfg = dict(golden["config"])
    model = _pretrainer(golden, impl)
    with torch.no_grad():
        out = model(golden["images"], mask=golden["mask_stage4"], picture=True)
    torch.testing.assert_close(out.loss, golden["loss"], rtol=LOSS_RTOL, atol=0)
    # Rows 0..B-1 decode the mask==0 group, rows B..2B-1 the mask==1 group: the release's order.
    torch.testing.assert_close(out.picture.reconstruction, golden["reconstruction"], rtol=0, atol=RECON_ATOL)

    encoder_cfg = {k: v for k, v in cfg.items() if not k.startswith("decoder")}
    classifier = mixmim.create_classifier("mixmim_base", num_classes=10, attention_impl=impl, **encoder_cfg)
    state = mixmim.convert_official(golden["pretrain_state_dict"], target="encoder")
    state.update(golden["finetune_head"])
    classifier.load_state_dict(state, strict=True)
    classifier.eval()
    with torch.no_grad():
        logits = classifier(golden["images"])
    torch.testing.assert_close(logits, golden["logits"], rtol=0, atol=LOGITS_ATOL)


def _release_forward(model, images, mask):
    """The release's ``forward`` (models_mixmim.py), restated with our modules: mix with the
    batch flipped (partner B-1-i), encode with the mask as attention groups, decode
    ``cat([x*(1-m) + tok*m, x*m + tok*(1-m)])`` and score ``rec[:B]*m + rec[B:].flip(0)*(1-m)``
    against the normalised target, averaged over everything."""
    from mixmim.methods.patches import normalize_patches, patchify

    enc, dec = model.encoder, model.decoder
    m1 = enc.stage_groups(mask[None], 0).reshape(1, -1, 1).float()
    x = enc.patch_embed(images)
    x = x * (1 - m1) + x.flip(0) * m1
    z = enc.forward_tokens(x, mask[None])
    m = mask.reshape(1, -1, 1).float()
    y = dec.embed(z)
    token = dec.mask_token.expand_as(y)
    y = torch.cat([y * (1 - m) + token * m, y * m + token * (1 - m)]) + dec.pos_embed
    for blk in dec.blocks:
        y = blk(y)
    rec = dec.pred(dec.norm(y))
    b = images.shape[0]
    target = normalize_patches(patchify(images, 32))
    loss = ((rec[:b] * m + rec[b:].flip(0) * (1 - m) - target) ** 2).mean()
    return loss, rec


def test_release_forward_on_a_batch_of_four_pins_the_partner_rule(golden):
    """Golden-style check with more than two images, where partner B-1-i differs from any other
    pairing (with two images every rule pairs 0 and 1)."""
    model = _pretrainer(golden)
    g = torch.Generator().manual_seed(0)
    images = torch.cat([golden["images"], torch.randn(2, 3, 224, 224, generator=g)])
    mask = golden["mask_stage4"].long()
    with torch.no_grad():
        out = model(images, mask=mask, picture=True)
        loss, rec = _release_forward(model, images, mask)
    torch.testing.assert_close(out.picture.reconstruction, rec, rtol=0, atol=RECON_ATOL)
    torch.testing.assert_close(out.loss, loss, rtol=1e-6, atol=0)
    # ... and on the golden pair itself, the restated release gives the stored loss.
    with torch.no_grad():
        loss2, _ = _release_forward(model, golden["images"], mask)
    torch.testing.assert_close(loss2, golden["loss"], rtol=1e-6, atol=0)


def test_convert_official_handles_release_file_layout(golden):
    sd = golden["pretrain_state_dict"]
    wrapped = {"model": sd, "epoch": 3}
    assert mixmim.convert_official(wrapped).keys() == mixmim.convert_official(sd).keys()
    ddp = {"module." + k: v for k, v in sd.items()}
    assert mixmim.convert_official(ddp).keys() == mixmim.convert_official(sd).keys()


def test_converted_release_keys_cover_our_model_exactly():
    """Every name in the released MixMIM-B checkpoints maps onto ours with the same shape."""
    import json

    from conftest import SHARED

    for name, target, build in [
        ("official_keys_pretrain_base.json", "pretrainer", lambda: mixmim.create_pretrainer("mixmim", "mixmim_base")),
        ("official_keys_finetune_base.json", "encoder", lambda: mixmim.create_classifier("mixmim_base", 1000)),
    ]:
        path = SHARED / "reference" / name
        if not path.exists():
            pytest.skip(f"{path} missing")
        shapes = json.loads(path.read_text())
        with torch.device("meta"):
            model = build()
        fake = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
        converted = mixmim.convert_official(fake, target=target)
        ours = model.state_dict()
        assert set(converted) == set(ours), set(converted) ^ set(ours)
        for k, v in converted.items():
            assert tuple(v.shape) == tuple(ours[k].shape), k
