"""Every SimMIM recipe in configs/simmim/ (the settings of SimMIM sections 4.1-4.3 and one recipe per
row of Tables 1-5, 9 and 13) resolves with `mixmim pretrain --print-config` and trains two steps with
a tiny model override; the 800-epoch step recipe runs in the training loop with its step schedule,
and its Swin checkpoint fine-tunes at another size and window."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import train_two_steps
from mixmim.cli import main
from mixmim.config import load_config
from mixmim.models.registry import family_of
from mixmim.training.schedule import peak_lr

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "simmim"
MAIN = sorted(RECIPES.glob("*.yaml"))
ABLATIONS = sorted((RECIPES / "ablations").glob("*.yaml"))
# 64 px: every masked patch size of Table 1 (4 to 64) and every target resolution of Table 3
# (1/32 to 1/1) still fits the image.
TINY = {
    "swin": ["model.img_size=64", "model.embed_dim=16", "model.depths=[1,1,2,1]", "model.num_heads=[1,2,2,4]",
             "model.window_size=4", "method.head_window=4"],
    "vit": ["model.img_size=64", "model.embed_dim=32", "model.options.depth=2", "model.num_heads=2"],
    "resnetv2": ["model.name=resnetv2_50", "model.img_size=64",
                 "model.options={layers: [1,1,1,1], channels: [128,256,512,1024], stem_chs: 32, width_factor: 1}"],
    "mixmim": ["model.name=mixmim_tiny", "model.img_size=64", "model.embed_dim=16", "model.depths=[1,1,1,1]",
               "model.num_heads=[1,1,2,2]", "model.window_size=[8,8,4,2]"],
}


def tiny_overrides(path: Path) -> list[str]:
    return TINY[family_of(load_config(path).model.name)]


def test_there_is_a_recipe_per_setting_and_table_row():
    assert {p.stem for p in MAIN} == {"swin_base_192_100ep", "vit_base_224_800ep", "swin_base_192_800ep_step",
                                      "swin_large_192_800ep_step", "mixmim_base_192_800ep_step",
                                      "resnetv2_50x4_192_300ep"}
    names = [p.stem for p in ABLATIONS]
    counts = {t: sum(n.startswith(f"table{t}_") for n in names) for t in (1, 2, 3, 4, 5, 9, 13)}
    # Table 1: 3 square + 6 block-wise + 20 random rows; Table 5 without the tokenizer rows; Table 13's
    # 18 rows less the 4 (8 and 256 bins at 192^2 and 48^2) that are Table 5 rows' files.
    assert counts == {1: 29, 2: 4, 3: 6, 4: 2, 5: 9, 9: 4, 13: 14}


@pytest.mark.parametrize("path", MAIN + ABLATIONS, ids=lambda p: p.stem)
def test_recipe_resolves_and_runs_two_tiny_steps(path, capsys, tmp_path):
    assert main(["pretrain", "--config", str(path), "--print-config"]) == 0
    assert "name: simmim" in capsys.readouterr().out
    paper = load_config(path)
    assert paper.method_name() == "simmim" and paper.train.batch_size == 2048
    assert paper.optim.betas == (0.9, 0.999) and paper.data.crop_scale == (0.67, 1.0)
    if path in ABLATIONS:  # the section 4.1.1 setting, one option changed
        assert (paper.model.name, paper.model.img_size, paper.model.window_size) == ("swin_base", 192, 6)
        assert peak_lr(paper.optim, 2048) == pytest.approx(8e-4) and paper.optim.warmup_epochs == 10
        assert paper.train.epochs == (300 if "300ep" in path.stem else 100)
    cfg = load_config(path, tiny_overrides(path))
    model = train_two_steps(tmp_path, cfg)
    for key, value in paper.method_options().items():
        if key != "head_window" and value is not None:  # None: the data's statistics, resolved at build
            assert getattr(model.config, key) == value, key


def test_scaling_recipes_use_the_step_schedule_of_section_4_3():
    for size, window in (("base", 6), ("large", 12)):
        cfg = load_config(RECIPES / f"swin_{size}_192_800ep_step.yaml")
        assert (cfg.model.name, cfg.model.window_size, cfg.train.epochs) == (f"swin_{size}", window, 800)
        o = cfg.optim
        assert (o.schedule, o.step_fractions, o.step_gamma, o.warmup_epochs) == ("step", [0.875], 0.1, 10)
        assert peak_lr(o, cfg.train.batch_size) == pytest.approx(4e-4)
    vit = load_config(RECIPES / "vit_base_224_800ep.yaml")
    assert (vit.model.img_size, vit.optim.schedule, vit.optim.warmup_epochs) == (224, "cosine", 20)


def test_step_recipe_trains_and_its_swin_checkpoint_finetunes_at_another_window(tmp_path, class_folder):
    """SimMIM section 4.3 / Table 7: pretrain at 192 px with window 6, fine-tune at 224 with window 7.
    Here 64 px / window 2 -> 96 px / window 3: the relative position tables are resized at load time."""
    from mixmim.training.pretrain import run_pretraining

    overrides = [f"output_dir={tmp_path}", "name=swin", "model.img_size=64", "model.embed_dim=16",
                 "model.depths=[2,2,2,2]", "model.num_heads=[1,2,2,4]", "model.window_size=2",
                 "data.source=bundled", "data.bundled_epoch_size=16", "train.batch_size=2", "train.max_steps=8",
                 "train.num_workers=0", "train.log_every=1", "train.checkpoint_every=100", "train.progress=false",
                 "train.device=cpu", "optim.warmup_steps=2", "optim.lr=4e-4", "optim.warmup_lr=0.0"]
    cfg = load_config(RECIPES / "swin_base_192_800ep_step.yaml", overrides)
    summary = run_pretraining(cfg)
    assert summary["step"] == 8 and np.isfinite(summary["last_loss"])
    with open(tmp_path / "swin" / "metrics.csv") as f:
        lrs = [float(row["lr"]) for row in csv.DictReader(f) if row["lr"]]
    # Warm-up over 2 steps from warmup_lr (0 here) as timm's scheduler in SimMIM's code, 4e-4 until
    # step round(0.875 * 8) = 7, then 4e-5.
    assert lrs == pytest.approx([0.0, 2e-4, 4e-4, 4e-4, 4e-4, 4e-4, 4e-4, 4e-5])

    out = tmp_path / "ft"
    assert main(["finetune", "--checkpoint", str(tmp_path / "swin"), "--data", str(class_folder), "--output", str(out),
                 "--img-size", "96", "--window-size", "3,3", "--epochs", "1", "--batch-size", "4",
                 "--num-workers", "0", "--no-progress", "--val-fraction", "0.5", "--layer-decay", "0.9",
                 "--drop-path", "0.1", "--warmup-epochs", "0"]) == 0
    kept = torch.load(out / "model.pt", weights_only=False)
    config = kept["encoder_config"]
    assert list(config["img_size"]) == [96, 96] and list(config["window_size"]) == [3, 3]
    best = kept["model"]
    assert best["layers.0.blocks.0.attn.relative_position_bias_table"].shape == (5 * 5, 1)  # (2 x 3 - 1)^2
