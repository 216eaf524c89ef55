"""Every recipe's "Run it small" command (the one a user copies to try a recipe on a CPU) resolves and
follows the small-run rule that docs/study justifies: peak learning rate 1e-3 whatever the batch, a
warm-up of 10% of the run, then cosine."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from mixmim.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml") if "study" not in p.relative_to(CONFIGS).parts
                 and "Run it small" in p.read_text())


def small_run(path: Path) -> list[str]:
    """The header's command as overrides (``--data X`` as data.source, ``--name`` as name)."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "Run it small" in line)
    words: list[str] = []
    for line in lines[start + 1:]:
        text = line.lstrip("#").strip()
        words += shlex.split(text.rstrip("\\"))
        if not text.endswith("\\"):
            break
    assert words[:2] == ["mixmim", "pretrain"], words
    overrides, i = [], 2
    while i < len(words):
        word = words[i]
        if word in ("-c", "--config"):
            assert (CONFIGS.parent / words[i + 1]).resolve() == path.resolve(), words[i + 1]
            i += 2
        elif word == "--data":
            overrides.append(f"data.source={words[i + 1]}")
            i += 2
        elif word == "--name":
            overrides.append(f"name={words[i + 1]}")
            i += 2
        else:
            assert "=" in word and not word.startswith("-"), word
            overrides.append(word)
            i += 1
    return overrides


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
