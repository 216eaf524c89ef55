"""MAE (MixedAE section 3.1; He et al. 2022) on the plain ViT: the encoder sees exactly the kept patches,
the loss reads only the hidden ones, other encoder families are refused, and the recipes, the training
loop and the transfer commands run with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mixmim
import mixmim.methods.mae as mae_module
from conftest import TINY_DECODER, TINY_ENCODERS, tiny_run, train_two_steps
from mixmim.config import load_config
from mixmim.methods.mae import MAE, kept_count, random_patch_masks
from mixmim.methods.patches import masked_mse, normalize_patches, patchify

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = dict(TINY_ENCODERS["vit_tiny"], **TINY_DECODER)
# The ViT at 128 px: 8 x 8 = 64 patches of 16 pixels.
VIT_MODEL = ["model.name=vit_tiny", "model.img_size=128", "model.options.embed_dim=32", "model.options.depth=2",
             "model.options.num_heads=2"]
VIT_DECODER = ["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_num_heads=2"]


def tiny_mae(**options) -> MAE:
    return mixmim.create_pretrainer("mae", "vit_tiny", **TINY, **options)


def test_masks_hide_three_quarters_of_every_image_independently():
    masks = random_patch_masks(6, (8, 8), 0.75, torch.Generator().manual_seed(0))
    assert masks.shape == (6, 8, 8)
    assert masks.reshape(6, -1).sum(dim=1).tolist() == [48] * 6  # 64 - int(64 * 0.25)
    assert len({tuple(m.flatten().tolist()) for m in masks}) == 6  # one draw per image
    assert kept_count(196, 0.75) == 49


def test_encoder_receives_exactly_the_kept_tokens():
    model = tiny_mae().eval()
    images = torch.randn(3, 3, 128, 128)
    mask = model.sample_mask(3, torch.Generator().manual_seed(1))
    seen = {}
    hook = model.encoder.blocks[0].register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    out = model(images, mask, picture=True)
    hook.remove()

    enc = model.encoder
    tokens = enc.patch_embed(images) + enc.pos_embed[:, 1:]
    kept = [torch.nonzero(row == 0).flatten() for row in mask.reshape(3, -1)]
    expected = torch.stack([torch.cat([enc.cls_token[0] + enc.pos_embed[0, :1], tokens[i, idx]])
                            for i, idx in enumerate(kept)])
    assert seen["x"].shape == (3, 1 + 16, 32)  # the class token and the 16 kept patches, nothing else
    torch.testing.assert_close(seen["x"], expected)
    assert out.picture.hidden.sum(dim=1).tolist() == [48] * 3
    assert torch.equal(out.picture.hidden, mask.reshape(3, -1).bool())


def test_loss_reads_the_hidden_patches_only(monkeypatch):
    model = tiny_mae().eval()
    images = torch.randn(2, 3, 128, 128)
    mask = model.sample_mask(2, torch.Generator().manual_seed(2))
    hidden = mask.reshape(2, -1).bool()
    base = model(images, mask, picture=True)
    torch.testing.assert_close(base.loss, masked_mse(base.picture.reconstruction, base.picture.target, hidden))
    real = mae_module.patch_targets

    def shifted_target(where):
        def targets_changed(pixels, patch, norm_pix):
            patches = real(pixels, patch, norm_pix).clone()
            # Only the target is changed: the encoder's input pixels stay the same.
            patches[where] += torch.randn_like(patches[where]) * 3.0
            return patches
        return targets_changed

    monkeypatch.setattr(mae_module, "patch_targets", shifted_target(~hidden))
    assert model(images, mask).loss.item() == pytest.approx(base.loss.item(), abs=1e-6)
    monkeypatch.setattr(mae_module, "patch_targets", shifted_target(hidden))
    assert abs(model(images, mask).loss.item() - base.loss.item()) > 1e-3


def test_target_is_normalised_pixels_and_inputs_show_the_kept_patches():
    model = tiny_mae().eval()
    images = torch.randn(2, 3, 128, 128)
    mask = model.sample_mask(2, torch.Generator().manual_seed(3))
    out = model(images, mask, picture=True).picture
    torch.testing.assert_close(out.target, normalize_patches(patchify(images, 16)))
    shown = patchify(out.inputs, 16)
    hidden = mask.reshape(2, -1).bool()
    assert (shown[hidden] == 0).all()  # greyed: the data mean (x * 0 is exactly 0)
    assert torch.equal(shown[~hidden], patchify(images, 16)[~hidden])  # x * 1 is exactly x
    assert torch.equal(out.sources, torch.arange(2)) and out.reconstruction.shape == (2, 64, 768)


def test_masks_given_by_the_caller_are_checked():
    model = tiny_mae()
    images = torch.randn(2, 3, 128, 128)
    uneven = model.sample_mask(2)
    uneven[0].view(-1)[torch.nonzero(uneven[0].view(-1) == 0)[0]] = 1
    with pytest.raises(ValueError, match="same number"):
        model(images, uneven)
    with pytest.raises(ValueError, match="hides every patch"):
        model(images, torch.ones(8, 8, dtype=torch.long))
    shared = model.sample_mask(1)[0]  # one (h, w) mask for the batch is accepted
    assert model(images, shared, picture=True).picture.hidden.sum().item() == 2 * 48


@pytest.mark.parametrize("name", [n for n in TINY_ENCODERS if not n.startswith("vit")])
@pytest.mark.parametrize("method", ["mae", "mixedae"])
def test_hierarchical_encoders_are_refused_in_one_line(name, method):
    with pytest.raises(ValueError) as info:
        mixmim.create_pretrainer(method, name, **TINY_ENCODERS[name], **TINY_DECODER)
    message = str(info.value)
    assert "\n" not in message and "plain ViT" in message and "subset of its tokens" in message


def test_weight_decay_follows_mae_code():
    from mixmim.training.optim import no_weight_decay_names

    assert no_weight_decay_names(tiny_mae()) == set()


def test_two_training_steps(tmp_path):
    train_two_steps(tmp_path, method=tiny_mae())


RECIPES = sorted((CONFIGS / "mae").glob("*.yaml"))


def test_there_is_a_recipe_per_length():
    assert {p.stem for p in RECIPES} == {"mae_vit_base_800ep", "mae_vit_base_1600ep"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_has_paper_values_and_trains_two_tiny_steps(path, tmp_path):
    paper = load_config(path)
    assert paper.method_name() == "mae" and paper.model.name == "vit_base" and paper.model.img_size == 224
    assert paper.model.options == {"fixed_pos_embed": True}
    assert paper.optim.base_lr == 1.5e-4 and paper.optim.weight_decay == 0.05 and paper.optim.betas == (0.9, 0.95)
    assert paper.optim.warmup_epochs == 40 and paper.train.batch_size == 4096
    assert paper.train.epochs == int(path.stem.split("_")[-1][:-2])
    assert paper.method_options() == dict(mask_ratio=0.75, decoder_dim=512, decoder_depth=8, decoder_num_heads=16,
                                          norm_pix_loss=True, xavier_init=True)  # the typed section: every field
    cfg = load_config(path, VIT_MODEL + VIT_DECODER)
    model = mixmim.create_pretrainer(cfg.method_name(), cfg.model.name, **cfg.model.encoder_overrides(),
                                     **cfg.method_options())
    assert not model.encoder.pos_embed.requires_grad  # MAE's fixed sine-cosine positions
    train_two_steps(tmp_path, cfg, method=model)


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    from mixmim.training.pretrain import run_pretraining

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("mae_run")
        overrides = [o for o in tiny_run(root, "method.name=mae") if not o.startswith("model.")]
        overrides += ["model.name=vit_tiny", "model.img_size=128",
                      "model.options={embed_dim: 32, depth: 2, num_heads: 2}", "train.max_steps=3"]
        summary = run_pretraining(load_config(None, overrides))
    finally:
        torch.set_num_threads(threads)
    return Path(summary["run_dir"]), summary


def test_pretrain_run_writes_checkpoints_metrics_pictures_and_encoder(mae_run):
    run_dir, summary = mae_run
    assert summary["step"] == 3 and summary["stopped"] is None
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["step_00000003.pt"]
    for name in ("metrics.csv", "reconstruction.png", "encoder.safetensors", "encoder.json"):
        assert (run_dir / name).is_file(), name
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,loss") and len(rows) == 4


def test_transfer_commands_accept_the_run_folder(mae_run, tmp_path):
    from mixmim.cli import main
    from mixmim.interop.pretrained import build_encoder
    from mixmim.interop.weights import open_weights

    run_dir, _ = mae_run
    pretrained = open_weights(run_dir)
    assert pretrained.family == "vit" and pretrained.config["embed_dim"] == 32
    encoder = build_encoder(pretrained)
    saved = torch.load(next((run_dir / "checkpoints").glob("*.pt")), weights_only=False)["model"]
    torch.testing.assert_close(encoder.blocks[1].attn.qkv.weight, saved["encoder.blocks.1.attn.qkv.weight"])
    data = _class_folder(tmp_path / "classes")
    common = ["--checkpoint", str(run_dir), "--data", str(data), "--num-workers", "0", "--no-progress",
              "--val-fraction", "0.34", "--batch-size", "4"]
    assert main(["knn", *common, "--output", str(tmp_path / "knn")]) == 0
    assert main(["linprobe", *common, "--output", str(tmp_path / "lp"), "--epochs", "1"]) == 0
    assert main(["finetune", *common, "--output", str(tmp_path / "ft"), "--epochs", "1", "--warmup-epochs", "0"]) == 0
    for out in ("knn", "lp", "ft"):
        assert 0.0 <= json.loads((tmp_path / out / "results.json").read_text())["acc1"] <= 100.0


def _class_folder(root: Path) -> Path:
    """Three classes of six 48-pixel images each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, colour in {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}.items():
        (root / name).mkdir(parents=True)
        for i in range(6):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_decoder_carries_the_class_token():
    """MAE's decoder (models_mae.py ``forward_decoder``): the encoder's class token, embedded, goes in
    front of the patches at a position of zeros and runs through every block; its output is dropped.
    So the encoder's final class-token feature gets a gradient (it got exactly zero before)."""
    model = tiny_mae().eval()
    images = torch.randn(2, 3, 128, 128)
    mask = model.sample_mask(2, torch.Generator().manual_seed(4))
    seen = {}
    # (A pre-hook's return value replaces the block's input: this one returns None.)
    hook = model.decoder.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach()))
    real = model.encoder.forward_kept

    def keep_output(tokens, keep_index):
        seen["encoded"] = real(tokens, keep_index)
        seen["encoded"].retain_grad()
        return seen["encoded"]

    model.encoder.forward_kept = keep_output
    out = model(images, mask)
    hook.remove()
    assert seen["x"].shape == (2, 1 + 64, 32)
    torch.testing.assert_close(seen["x"][:, :1], model.decoder.embed(seen["encoded"][:, :1]).detach())
    out.loss.backward()
    # Every image's final class-token feature is trained.
    assert seen["encoded"].grad[:, 0].abs().amax(dim=-1).min() > 0


def test_encoder_is_initialised_as_maes_code():
    """models_mae.py ``initialize_weights``: the patch projection xavier-uniform as a linear map of the
    flattened patch, every linear layer xavier-uniform with zero bias."""
    import math

    for xavier in (True, False):
        enc = tiny_mae(xavier_init=xavier).encoder
        proj = enc.patch_embed.proj
        bound = math.sqrt(6 / (proj.weight[0].numel() + proj.out_channels))
        std = proj.weight.std().item()
        if xavier:
            assert proj.weight.abs().max() <= bound and std == pytest.approx(bound / math.sqrt(3), rel=0.1)
            linear = [m for m in enc.modules() if isinstance(m, torch.nn.Linear)]
            assert all(bool((m.bias == 0).all()) for m in linear)
            assert all(m.weight.abs().max() <= math.sqrt(6 / (m.in_features + m.out_features)) for m in linear)
        else:  # PyTorch's default for a convolution: about a third of xavier's spread here
            assert std < 0.6 * bound / math.sqrt(3)
