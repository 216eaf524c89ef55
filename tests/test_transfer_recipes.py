"""The transfer recipes (configs/finetune, configs/linprobe; issue 19): each resolves with --print-config,
holds its paper's (or its authors' code's) values, and its header's "Run it small" command trains two
tiny steps on a class folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import header_command
from mixmim.cli import main
from mixmim.config import list_recipes, recipe_path, recipe_verb
from mixmim.training.schedule import build_schedule
from mixmim.transfer.run import load_transfer_config

TRANSFER = list_recipes(verb="finetune") + list_recipes(verb="linprobe")


def small_command(name: str, data: Path) -> list[str]:
    """The header's "Run it small" command as argv for ``mixmim.cli.main`` (DIR -> ``data``)."""
    words = header_command(recipe_path(name))
    assert words[0] == "mixmim" and words[1] == recipe_verb(name) and words[3] == name, words[:4]
    return [str(data) if w == "DIR" else w for w in words[1:]]


def test_there_is_a_recipe_per_row():
    assert set(TRANSFER) >= {
        "finetune/mixmim_base_224_100ep", "finetune/mixmim_large_224_50ep", "finetune/mixmim_huge_224_50ep",
        "finetune/mixmim_base_384_100ep", "finetune/simmim_swin_base_224_100ep",
        "finetune/simmim_swin_base_224_from800ep", "finetune/simmim_swin_large_224_from800ep",
        "finetune/simmim_vit_base_224_100ep", "finetune/mae_vit_base_100ep", "finetune/mae_vit_large_50ep",
        "finetune/mixedae_vit_base_100ep", "finetune/mixmae_base_224_100ep", "linprobe/mae_vit_base_90ep",
        "linprobe/simmim_vit_base_layers_100ep", "finetune/mixmim_base_inat2018_100ep",
        "finetune/mixmim_base_inat2019_100ep", "finetune/mixmim_base_places205_100ep",
        "finetune/mixmim_base_places365_100ep", "finetune/simmim_swin_base_inat2018_100ep",
        "finetune/mixedae_vit_base_transfer_sgd_5k"}


@pytest.mark.parametrize("name", TRANSFER)
def test_recipe_resolves_with_print_config(name, class_folder, capsys):
    verb = recipe_verb(name)
    assert main([verb, "-c", name, "--data", str(class_folder), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["name"] == Path(name).name and printed["data"]["path"] == str(class_folder)
    header = recipe_path(name).read_text().splitlines()
    assert header[0].startswith("# ") and len(header[0]) <= 130


def _schedule(name: str, data: Path, steps_per_epoch: int = 100):
    config = load_transfer_config(recipe_verb(name), recipe_path(name), [f"data.path={data}"])
    total = config.train.epochs * steps_per_epoch
    return config, build_schedule(config.optim, total, steps_per_epoch, config.train.batch_size)


@pytest.mark.parametrize("name, peak, warmup_epochs, layer_decay, drop_path, epochs", [
    ("finetune/mixmim_base_224_100ep", 5e-4 * 1024 / 256, 5, 0.7, 0.1, 100),   # MixMIM Table 12
    ("finetune/mixmim_large_224_50ep", 5e-4 * 1024 / 256, 5, 0.7, 0.2, 50),
    ("finetune/mixmim_huge_224_50ep", 5e-4 * 1024 / 256, 5, 0.7, 0.3, 50),
    ("finetune/mae_vit_base_100ep", 5e-4 * 1024 / 256, 5, 0.65, 0.1, 100),     # MAE A.1
    ("finetune/mae_vit_large_50ep", 1e-3 * 1024 / 256, 5, 0.75, 0.2, 50),
    ("finetune/mixedae_vit_base_100ep", 5e-4 * 1024 / 256, 5, 0.65, 0.1, 100),  # MixedAE Table 5
    ("finetune/mixedae_vit_large_50ep", 1e-3 * 512 / 256, 5, 0.75, 0.1, 50),   # Table 5: one drop path, 0.1
    ("finetune/mixmae_base_224_100ep", 5e-4 * 1024 / 256, 5, 0.7, 0.15, 100),  # MixMAE supplement Table 2
    ("finetune/simmim_swin_base_224_100ep", 5e-3, 20, 0.9, 0.1, 100),          # SimMIM 4.1.1: 5e-3 at 2048
    ("finetune/simmim_swin_base_224_from800ep", 5e-3, 20, 0.8, 0.1, 100),
    ("finetune/simmim_swin_large_224_from800ep", 5e-3, 20, 0.75, 0.1, 100),
    ("finetune/simmim_vit_base_224_100ep", 5e-3, 20, 0.65, 0.1, 100),
    ("finetune/simmim_swin_base_inat2018_100ep", 1.6e-2, 20, 0.9, 0.1, 100),      # SimMIM appendix, iNat-2018
    *[(f"finetune/mixmim_base_{s}_100ep", 5e-4 * 1024 / 256, 5, 0.7, 0.1, 100)   # MixMIM Table 5: Table 12
      for s in ("inat2018", "inat2019", "places205", "places365")],
])
def test_finetune_recipes_hold_the_papers_values(name, peak, warmup_epochs, layer_decay, drop_path, epochs,
                                                 class_folder):
    config, schedule = _schedule(name, class_folder)
    assert schedule.peak == pytest.approx(peak) and schedule.warmup_steps == warmup_epochs * 100
    assert config.optim.layer_decay == layer_decay and config.model.drop_path_rate == drop_path
    assert config.train.epochs == epochs and config.finetune.rule == "none" and config.eval.select == "best"
    f = config.finetune
    assert (f.mixup, f.cutmix, f.smoothing, f.re_prob, f.auto_augment) == (0.8, 1.0, 0.1, 0.25, "rand-m9-mstd0.5-inc1")
    assert config.optim.betas == (0.9, 0.999) and config.optim.weight_decay == 0.05
    if name.startswith("finetune/simmim"):
        # SimMIM's code: WARMUP_LR and MIN_LR 2.5e-7 scaled by batch / 512 like the peak; timm's cosine over
        # the whole run, the warm-up inside it: half-way through the run it is at the midpoint (MAE's cosine
        # after the warm-up would still be above it).
        assert schedule.warmup_lr == schedule.min_lr == pytest.approx(2.5e-7 * 4)
        assert config.optim.cosine_after_warmup is False
        assert schedule(schedule.total_steps // 2) == pytest.approx((schedule.peak + schedule.min_lr) / 2)
        assert config.optim.layer_decay_rule == ("auto" if "vit" in name else "simmim")
    else:
        assert schedule.warmup_lr == 0.0 and schedule.min_lr == 1e-6 and config.optim.cosine_after_warmup


def test_the_384_recipe_changes_the_windows_with_the_input(class_folder):
    config, _ = _schedule("finetune/mixmim_base_384_100ep", class_folder)
    assert config.model.img_size == 384 and config.model.window_size == [16, 16, 24, 12]
    assert [384 // 4 // 2**i % w for i, w in enumerate(config.model.window_size)] == [0, 0, 0, 0]


def test_maes_linear_probe_recipe(class_folder):
    config, schedule = _schedule("linprobe/mae_vit_base_90ep", class_folder)
    assert config.optim.name == "lars" and schedule.peak == pytest.approx(0.1 * 16384 / 256)
    assert config.optim.weight_decay == 0.0 and schedule.warmup_steps == 10 * 100 and config.train.epochs == 90
    assert config.probe.features == "augmented"


def test_mixedae_transfer_protocol_recipe(class_folder):
    """MixedAE appendix B: SGD, 5 000 iterations, cosine, weight decay 0, the rate one of the grid."""
    config, schedule = _schedule("finetune/mixedae_vit_base_transfer_sgd_5k", class_folder)
    assert config.optim.name == "sgd" and config.optim.weight_decay == 0.0 and config.optim.layer_decay is None
    assert config.train.max_steps == 5000 and config.optim.lr in (1e-3, 3e-3, 1e-2, 3e-2)
    assert schedule.warmup_steps == 0
    f = config.finetune
    assert (f.mixup, f.cutmix, f.smoothing, f.re_prob, f.auto_augment) == (0.0, 0.0, 0.0, 0.0, None)


def test_simmims_per_layer_probe_recipe(class_folder):
    config, schedule = _schedule("linprobe/simmim_vit_base_layers_100ep", class_folder)
    assert config.probe.layers == list(range(4, 13)) and config.train.epochs == 100
    assert schedule.warmup_steps == 5 * 100 and config.optim.name == "lars"


@pytest.mark.parametrize("name", TRANSFER)
def test_small_run_trains_two_steps(name, class_folder, tmp_path):
    argv = small_command(name, class_folder) + ["--output", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0.0 <= results["acc1"] <= 100.0
    with open(tmp_path / "run" / "metrics.csv") as handle:
        assert [row["step"] for row in csv.DictReader(handle)][-1] == "2"  # two steps, then the evaluation


def _built(name: str, checkpoint: Path, data: Path, *overrides: str):
    """The classifier and optimiser groups the fine-tuning verb builds for recipe ``name`` from ``checkpoint``."""
    from mixmim.transfer.classifier import build_classifier, classifier_groups, resolve_model

    config = load_transfer_config("finetune", recipe_path(name), [f"data.path={data}", f"checkpoint={checkpoint}",
                                                                  *overrides])
    model = build_classifier(resolve_model(config), config, num_classes=3)
    return config, model, classifier_groups(model, config.optim)


@pytest.fixture(scope="module")
def mae_encoder(tmp_path_factory):
    """An MAE-pretrained ViT's encoder export (final norm included, as MAE's checkpoints have it)."""
    import mixmim
    from mixmim.interop.export import save_encoder

    torch.manual_seed(0)
    model = mixmim.create_pretrainer("mae", "vit_tiny", img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                                     decoder_dim=16, decoder_depth=1, decoder_num_heads=2)
    with torch.no_grad():
        model.encoder.norm.weight.uniform_(0.5, 1.5)  # a trained norm: not what a fresh LayerNorm holds
    path = tmp_path_factory.mktemp("mae") / "encoder"
    save_encoder(model.encoder, path)
    return path.with_suffix(".safetensors"), model.encoder


@pytest.mark.parametrize("name, drop_path, layer_decay", [
    ("finetune/mae_vit_base_100ep", 0.1, 0.65), ("finetune/mae_vit_large_50ep", 0.2, 0.75),
    ("finetune/mixedae_vit_base_100ep", 0.1, 0.65), ("finetune/mixedae_vit_large_50ep", 0.1, 0.75),
    ("finetune/simmim_vit_base_224_100ep", 0.1, 0.65)])
def test_vit_finetune_recipes_build_the_papers_model(name, drop_path, layer_decay, mae_encoder, class_folder):
    """The built model, not the YAML: MAE's main_finetune.py (global_pool=True) and SimMIM's ViT (BEiT's
    mean pooling) average the patch tokens and normalise after the pooling (fc_norm, the pretrained
    final norm dropped, fc_norm fresh: MAE's only missing keys are head.* and fc_norm.*); drop path
    in every block; layer decay in the optimiser's groups."""
    checkpoint, pretrained = mae_encoder
    config, model, groups = _built(name, checkpoint, class_folder, "model.img_size=32")
    encoder = model.encoder
    assert encoder.global_pool == "avg" and isinstance(encoder.norm, torch.nn.Identity)
    assert isinstance(encoder.fc_norm, torch.nn.LayerNorm)
    assert torch.equal(encoder.fc_norm.weight, torch.ones(16)) and torch.equal(encoder.fc_norm.bias, torch.zeros(16))
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in encoder.blocks]
    assert rates == pytest.approx([0.0, drop_path])  # timm's rule: linear from 0 to the rate over the blocks
    torch.testing.assert_close(encoder.blocks[0].attn.qkv.weight, pretrained.blocks[0].attn.qkv.weight)
    encoder.eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = encoder.blocks(encoder._pos_embed(encoder.patch_embed(x)))
    want = encoder.head(encoder.fc_norm(tokens[:, encoder.num_prefix_tokens:].mean(1)))
    torch.testing.assert_close(model(x), want)
    scales = sorted({round(g["lr_scale"], 10) for g in groups})
    assert scales[-1] == pytest.approx(1.0) and scales[-2] == pytest.approx(layer_decay)
    assert scales[0] == pytest.approx(layer_decay ** (len(encoder.blocks) + 1))


@pytest.mark.parametrize("name, drop_path", [("finetune/mixmim_base_224_100ep", 0.1),
                                             ("finetune/mixmae_base_224_100ep", 0.15),
                                             ("finetune/mixmim_large_224_50ep", 0.2)])
def test_mixmim_finetune_recipes_build_their_papers_drop_path(name, drop_path, class_folder, tmp_path):
    """MixMIM Table 12 gives drop path 0.1 for B, MixMAE's supplement Table 2 0.15: read from the built
    blocks (timm's linear rule: the last block gets the recipe's rate)."""
    import mixmim
    from mixmim.interop.export import save_encoder

    encoder = mixmim.create_encoder("mixmim_tiny", img_size=64, embed_dim=16, depths=(1, 1, 1, 1),
                                    num_heads=(1, 1, 1, 1), window_size=(4, 4, 4, 2))
    save_encoder(encoder, tmp_path / "encoder")
    _, model, _ = _built(name, tmp_path / "encoder.safetensors", class_folder, "model.img_size=64",
                         "model.window_size=[4,4,4,2]")
    rates = [m.drop_prob for m in model.encoder.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(drop_path)


@pytest.mark.parametrize("name", ["finetune/mae_vit_base_100ep", "linprobe/mae_vit_base_90ep",
                                  "segment/mixmim_base_upernet_16k", "detect/mixmim_base_maskrcnn_55ep"])
def test_print_config_of_a_transfer_recipe_needs_no_data(name, capsys):
    """What a recipe resolves to can be read before the data is chosen: data.path null and a last line
    saying it is still to be given (it used to refuse to print)."""
    assert main([recipe_verb(name), "-c", name, "--print-config"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1] == "# data.path is still to be given: --data DIR (or data.path=DIR)"
    printed = yaml.safe_load(out)
    assert printed["name"] == Path(name).name and printed["data"]["path"] is None
