"""Every recipe in configs/encoders/ (one per MixMIM row of Table 3 and supplement Table 13) resolves at
paper scale, its "Run it small" command resolves, and it trains two steps with a tiny model of its family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_DECODER, TINY_ENCODERS, small_run, train_two_steps
from mixmim.config import load_config
from mixmim.methods.options import MixMIMConfig
from mixmim.models.registry import family_of

ENCODERS = Path(__file__).resolve().parents[1] / "configs" / "encoders"
RECIPES = sorted(ENCODERS.glob("*.yaml"))

# recipe -> (registry model, pretraining epochs) as MixMIM Table 3 / Table 13 state them ("PVT-L" is
# PVT v1 Large in the paper; pvt_v2_b5 is this project's largest PVT and stands in for it).
ROWS = {
    "table3_vit_base_300ep": ("vit_base", 300),
    "table3_vit_large_300ep": ("vit_large", 300),
    "mixmae_supp_table7_vit_base_600ep": ("vit_base", 600),
    "table3_swin_base_600ep": ("swin_base", 600),
    "table3_swin_large_600ep": ("swin_large", 600),
    "table3_pvt_v2_b5_300ep": ("pvt_v2_b5", 300),
    "table13_resnetv2_50x3_300ep": ("resnetv2_50x3", 300),
    "table13_resnetv2_101x3_300ep": ("resnetv2_101x3", 300),
}


def tiny_overrides(model: str) -> list[str]:
    """The conftest's tiny model of ``model``'s family (options as one YAML flow mapping) and decoder."""
    name = next(n for n in TINY_ENCODERS if family_of(n) == family_of(model))
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_ENCODERS[name].items() if k != "img_size"}
    return [f"model.name={name}", f"model.img_size={TINY_ENCODERS[name]['img_size']}",
            f"model.options={json.dumps(options)}", *(f"method.{k}={v}" for k, v in TINY_DECODER.items())]


def small_command(path: Path) -> list[str]:
    """The overrides of the header's "Run it small" command, which runs on the bundled photos."""
    overrides = small_run(path)
    assert overrides[0] == "data.source=bundled", overrides
    return overrides


def test_there_is_a_recipe_per_table_row():
    assert {p.stem for p in RECIPES} == set(ROWS)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_encoder_recipe_resolves_and_runs_two_tiny_steps(path, tmp_path):
    paper = load_config(path)  # builds the paper-scale model on the meta device
    model, epochs = ROWS[path.stem]
    assert (paper.name, paper.model.name, paper.model.img_size, paper.train.epochs) == (path.stem, model, 224, epochs)
    assert paper.method_name() == "mixmim" and paper.train.batch_size == 1024
    assert (paper.optim.base_lr, paper.optim.weight_decay, paper.optim.betas, paper.optim.warmup_epochs) == \
        (1.5e-4, 0.05, (0.9, 0.95), 40)
    defaults = MixMIMConfig().with_decoder_of(paper.model.name)
    for key, value in paper.method_options().items():  # MixMIM's default recipe, written out
        assert getattr(defaults, key) == value, key

    small = load_config(path, small_command(path))
    assert small.data.source == "bundled" and small.model.img_size == 128
    assert family_of(small.model.name) == family_of(model)

    cfg = load_config(path, tiny_overrides(model))
    net = train_two_steps(tmp_path, cfg)  # through the loop
    assert net.encoder.family == family_of(model)
