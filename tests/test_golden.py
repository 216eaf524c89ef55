"""Numerical equivalence with the public release (shared/reference/golden_tiny_s0.pt)."""

import pytest
import torch

import mixmim


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_golden_loss_reconstruction_and_logits(golden, impl):
    cfg = dict(golden["config"])
    model = mixmim.create_pretrainer("mixmim", "mixmim_base", attention_impl=impl, **cfg)
    model.load_state_dict(mixmim.convert_official(golden["pretrain_state_dict"]), strict=True)
    model.eval()
    with torch.no_grad():
        out = model(golden["images"], mask=golden["mask_stage4"])
    torch.testing.assert_close(out.loss, golden["loss"], rtol=1e-5, atol=0)
    # Rows 0..B-1 decode the mask==0 group, rows B..2B-1 the mask==1 group: the release's order.
    torch.testing.assert_close(out.reconstruction, golden["reconstruction"], rtol=1e-4, atol=1e-4)

    encoder_cfg = {k: v for k, v in cfg.items() if not k.startswith("decoder")}
    classifier = mixmim.create_classifier("mixmim_base", num_classes=10, attention_impl=impl, **encoder_cfg)
    state = mixmim.convert_official(golden["pretrain_state_dict"], target="encoder")
    state.update(golden["finetune_head"])
    classifier.load_state_dict(state, strict=True)
    classifier.eval()
    with torch.no_grad():
        logits = classifier(golden["images"])
    torch.testing.assert_close(logits, golden["logits"], rtol=1e-4, atol=1e-4)


def test_golden_loss_equals_release_unmixing_formula(golden):
    """The release's loss, written out from the README: every cell of image i predicted once, from
    row i where the mask is 1 and from row B + (B-1-i) where it is 0."""
    cfg = dict(golden["config"])
    model = mixmim.create_pretrainer("mixmim", "mixmim_base", **cfg)
    model.load_state_dict(mixmim.convert_official(golden["pretrain_state_dict"]), strict=True)
    rec = golden["reconstruction"]
    b = golden["images"].shape[0]
    m = golden["mask_stage4"].reshape(1, -1, 1)
    unmixed = rec[:b] * m + rec[b:].flip(0) * (1 - m)
    from mixmim.methods.patches import normalize_patches, patchify

    target = normalize_patches(patchify(golden["images"], 32))
    torch.testing.assert_close(((unmixed - target) ** 2).mean(), golden["loss"], rtol=1e-5, atol=0)


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
