"""Every recipe in configs/ablations/ (one per row of MixMIM Tables 6-10 and MixMAE supplement Tables 3-6;
a supplement row that is the same run as a MixMIM row is that row's file) and the main MixMIM and SimMIM
recipes load and train two steps with a tiny model override."""

from pathlib import Path

import pytest

from conftest import train_two_steps
from mixmim.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ABLATIONS = sorted((CONFIGS / "ablations").glob("*.yaml"))
TINY_MODEL = ["model.name=mixmim_tiny", "model.img_size=128", "model.embed_dim=16", "model.depths=[1,1,1,1]",
              "model.num_heads=[1,1,2,2]", "model.window_size=[16,8,4,4]"]
TINY_DECODER = ["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_num_heads=2"]


def test_there_is_a_recipe_per_table_row():
    # MixMAE supplement Tables 3, 5 and 6 repeat MixMIM Tables 6, 9 and 7 (the same pretraining, scored on
    # COCO): their rows are the MixMIM rows' files (tests/test_recipes_resolve.py checks the twins).
    names = {p.stem for p in ABLATIONS}
    assert len(names) == 29
    assert {f"table6_filling_{f}" for f in ("mix", "zero", "learnable", "shuffle", "zoomin")} <= names
    assert {"table7_dual_reconstruction", "table7_single_reconstruction"} <= names
    assert {f"table9_epochs_{e}" for e in (300, 600, 900)} <= names
    assert {f"supp_table4_images_{k}" for k in (2, 3, 4, 5)} | {"supp_table4_images_2_with_mask"} <= names
    assert not any(n.startswith(("supp_table3_", "supp_table5_", "supp_table6_")) for n in names)


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_ablation_recipe_runs_two_tiny_steps(path, tmp_path):
    paper = load_config(path)
    assert paper.model.name == "mixmim_base" and paper.train.batch_size == 1024 and paper.train.epochs >= 300
    assert paper.optim.base_lr == 1.5e-4 and paper.optim.warmup_epochs == 40
    cfg = load_config(path, TINY_MODEL + TINY_DECODER)
    model = train_two_steps(tmp_path, cfg)
    for key, value in paper.method_options().items():
        if value is None:  # the decoder sizes: the model's default, the tiny one here
            continue
        assert getattr(model.config, key) == (tuple(value) if isinstance(value, list) else value), key


@pytest.mark.parametrize("name, model", [("mixmim_large_in1k", "mixmim_large"), ("mixmim_huge_in1k", "mixmim_huge")])
def test_scaled_mixmim_recipes_are_bs_recipe_on_their_encoder(name, model):
    """MixMIM-L and -H (Table 4, Figure 2): MixMIM-B's recipe (600 epochs, batch 1024, base lr 1.5e-4,
    the 8 x 512 decoder) on the larger encoders, built at paper scale on the meta device."""
    paper, base = load_config(CONFIGS / f"{name}.yaml"), load_config(CONFIGS / "mixmim_base_in1k.yaml")
    assert paper.model.name == model and paper.train.epochs == 600 and paper.train.batch_size == 1024
    assert paper.method_options() == base.method_options() and paper.optim == base.optim


def test_mixedae_vit_large_recipe():
    paper = load_config(CONFIGS / "mixedae" / "mixedae_vit_large_1600ep.yaml")
    assert (paper.model.name, paper.train.epochs, paper.train.batch_size) == ("vit_large", 1600, 2048)
    assert paper.model.options == {"fixed_pos_embed": True} and paper.method_name() == "mixedae"
    assert paper.optim.base_lr == 7.5e-5


def test_main_recipes_run_two_tiny_steps(tmp_path):
    cfg = load_config(CONFIGS / "mixmim_base_in1k.yaml", TINY_MODEL + TINY_DECODER)
    assert cfg.method_options()["pretext"] == "masked_attention"
    train_two_steps(tmp_path / "mixmim", cfg)
    cfg = load_config(CONFIGS / "simmim" / "mixmim_base_192_800ep_step.yaml", TINY_MODEL)
    assert type(train_two_steps(tmp_path / "simmim", cfg)).__name__ == "SimMIM"
