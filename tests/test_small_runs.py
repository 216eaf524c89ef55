"""Every recipe's "Run it small" command (the one a user copies to try a recipe on a CPU) resolves and
follows the small-run rule that docs/study justifies: peak learning rate 1e-3 whatever the batch, a
warm-up of 10% of the run, then cosine."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import small_run
from mixmim.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Pretraining recipes (the transfer verbs' small runs are tests/test_transfer_recipes.py's and
# tests/test_dense_recipes.py's).
RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml")
                 if not {"study", "finetune", "linprobe", "detect", "segment"} & set(p.relative_to(CONFIGS).parts)
                 and "Run it small" in p.read_text())


def test_every_recipe_has_a_small_run():
    assert len(RECIPES) > 100


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_small_run_resolves_and_follows_the_rule(path):
    cfg = load_config(path, small_run(path))  # builds the model on the meta device: windows etc. must fit
    assert cfg.optim.lr == 1e-3, "small runs use a peak learning rate of 1e-3"
    if cfg.train.max_steps is not None:
        assert cfg.optim.warmup_steps == max(1, round(0.1 * cfg.train.max_steps))
    else:
        assert cfg.optim.warmup_epochs == pytest.approx(0.1 * cfg.train.epochs)
