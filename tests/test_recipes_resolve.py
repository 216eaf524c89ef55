"""Every recipe resolves to exactly what it resolved to before the recipes were rewritten to inherit from
base files (issue 22), key by key, against tests/fixtures/recipes_resolved_ea5c4ff.json.gz: every
recipe's ``load_config(path).to_dict()`` at commit ea5c4ff. A duplicate that was removed is checked
against the twin kept in its place, with only ``name`` allowed to differ. Recipes are found by name,
listed by ``mixmim recipes``, and each holds a short header and only the keys its row changes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import yaml

import mixmim.config.validation
from mixmim.cli import main
from mixmim.config import RECIPES, list_recipes, load_config, read_recipe, recipe_path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = json.loads(gzip.decompress((ROOT / "tests" / "fixtures" / "recipes_resolved_ea5c4ff.json.gz").read_bytes()))

# Exact duplicates removed -> the twin kept: the row of the main paper (MixMIM over the MixMAE supplement,
# SimMIM Table 5 over appendix Table 13), for MixedAE the first row in the paper's order.
REMOVED = {
    **{f"configs/ablations/supp_table3_filling_{f}.yaml": f"configs/ablations/table6_filling_{f}.yaml"
       for f in ("mix", "zero", "learnable", "shuffle", "zoomin")},
    **{f"configs/ablations/supp_table5_epochs_{e}.yaml": f"configs/ablations/table9_epochs_{e}.yaml"
       for e in (300, 600, 900)},
    **{f"configs/ablations/supp_table6_{r}_reconstruction.yaml": f"configs/ablations/table7_{r}_reconstruction.yaml"
       for r in ("dual", "single")},
    **{f"configs/simmim/ablations/table13_bins_{b}_{s}.yaml": f"configs/simmim/ablations/table5_target_{b}bin_{s}.yaml"
       for b in (8, 256) for s in (192, 48)},
    **{f"configs/mixedae/{row}.yaml": "configs/mixedae/table3a_ratio_025.yaml"
       for row in ("table3f_none", "table7a_naive", "table7b_recon_only")},
    **{f"configs/mixedae/{row}.yaml": "configs/mixedae/table3b_contrastive_post_ln.yaml"
       for row in ("table3c_positives_separate", "table3f_homocon")},
    **{f"configs/mixedae/{row}.yaml": "configs/mixedae/table3e_global_1st.yaml"
       for row in ("table3f_both", "table7b_both", "table7c_mixing_and_segment_embed")},
}
# The files every other recipe of their family names as `base:` (directly or through one another).
BASES = {"mixmim_base_in1k", "ablations/table9_epochs_300", "simmim/swin_base_192_100ep",
         "simmim/ablations/table9_cosine_100ep", "mae/mae_vit_base_800ep", "mixedae/mixedae_vit_base_300ep"}


def leaves(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
    """Every key path of a nested dict and its value (lists and tuples as lists)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(leaves(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = list(value) if isinstance(value, tuple) else value
    return out


def differences(before: dict, after: dict, tree: dict, ignore: tuple = ()) -> list[str]:
    """What changed: a key of the old resolution whose value differs now, or a key the recipe's files set
    (``tree``, the base chain merged) that the old resolution did not have. Keys the config gained
    since (new fields with defaults) may appear in ``after``: only old keys are compared."""
    old, new = leaves(before), leaves(after)
    found = [f"{'.'.join(k)}: {v!r} -> {new.get(k, '<missing>')!r}" for k, v in old.items()
             if k[0] not in ignore and _plain(new.get(k, KeyError)) != _plain(v)]
    found += [f"{'.'.join(k)}: set by the recipe, not in the old resolution" for k in leaves(tree)
              if k not in old and not any(o[:len(k)] == k for o in old)]
    return found


def _plain(value):
    return json.loads(json.dumps(value, default=repr))


def resolved(path: Path) -> dict:
    """``load_config(path).to_dict()`` without the meta-device model build of ``validate``: the other
    recipe tests build every recipe's model; 157 paper-scale builds would cost a minute here."""
    return load_config(path).to_dict()


@pytest.fixture
def no_build(monkeypatch):
    monkeypatch.setattr(mixmim.config.validation, "validate", lambda config: None)


def test_every_old_recipe_is_kept_or_has_a_twin():
    now = {f"configs/{name}.yaml" for name in list_recipes(verb="pretrain")}
    assert set(REMOVED).isdisjoint(now) and set(REMOVED.values()) <= now
    assert set(BEFORE) - set(REMOVED) <= now, sorted(set(BEFORE) - set(REMOVED) - now)
    assert len(BEFORE) == 157 and len(now & set(BEFORE)) == 157 - len(REMOVED) == 135


def test_removed_duplicates_were_exact_copies_of_their_twins():
    for gone, twin in REMOVED.items():
        assert {k: v for k, v in BEFORE[gone].items() if k != "name"} == \
            {k: v for k, v in BEFORE[twin].items() if k != "name"}, gone


# Changed on purpose since the fixture: the SimMIM recipes write their learning rates as SimMIM's code
# computes them (BASE_LR x batch / 512, WARMUP_LR and MIN_LR scaled the same way, timm's cosine over the
# whole run) instead of as absolute rates; test_simmim_rates_at_the_paper_batch_are_the_old_ones checks
# that the peak and the floor at the recipe's batch are what they were.
SIMMIM_RATE_KEYS = {f"optim.{k}" for k in ("lr", "base_lr", "lr_batch_divisor", "warmup_lr", "min_lr",
                                           "scale_lr_bounds", "cosine_after_warmup")}


def intended(old: str, line: str) -> bool:
    return old.startswith("configs/simmim/") and line.split(":", 1)[0] in SIMMIM_RATE_KEYS


@pytest.mark.parametrize("old", sorted(BEFORE), ids=lambda p: p.removeprefix("configs/").removesuffix(".yaml"))
def test_recipe_resolves_as_before(old, no_build):
    path = ROOT / REMOVED.get(old, old)
    found = differences(BEFORE[old], resolved(path), read_recipe(path), ignore=("name",) if old in REMOVED else ())
    found = [line for line in found if not intended(old, line)]
    assert not found, f"{path.relative_to(ROOT)}: " + "; ".join(found)


@pytest.mark.parametrize("old", sorted(o for o in BEFORE if o.startswith("configs/simmim/")),
                         ids=lambda p: p.removeprefix("configs/").removesuffix(".yaml"))
def test_simmim_rates_at_the_paper_batch_are_the_old_ones(old, no_build):
    from mixmim.training.schedule import build_schedule

    was = BEFORE[old]["optim"]
    config = resolved(ROOT / REMOVED.get(old, old))
    batch = config["train"]["batch_size"]
    assert batch == BEFORE[old]["train"]["batch_size"] == 2048
    schedule = build_schedule(load_config(ROOT / REMOVED.get(old, old)).optim, 1000, 10, batch)
    assert schedule.peak == pytest.approx(was["lr"])
    if config["optim"]["schedule"] == "cosine":  # a step schedule has no floor
        assert schedule.min_lr == pytest.approx(was["min_lr"])
    assert config["optim"]["lr"] is None and config["optim"]["lr_batch_divisor"] == 512


def test_the_comparison_sees_a_changed_value_and_an_added_key(tmp_path, no_build):
    """A row that changes one inherited value, and one that sets a method key its row did not have."""
    old = BEFORE["configs/ablations/table6_filling_zero.yaml"]
    changed = tmp_path / "changed.yaml"
    changed.write_text("base: ablations/table6_filling_zero\noptim: {weight_decay: 0.04}\n")
    assert differences(old, resolved(changed), read_recipe(changed)) == ["optim.weight_decay: 0.05 -> 0.04"]
    added = tmp_path / "added.yaml"
    added.write_text("base: ablations/table6_filling_zero\nmethod: {mask_cell: 32}\n")
    assert differences(old, resolved(added), read_recipe(added)) == [
        "method.mask_cell: set by the recipe, not in the old resolution"]


@pytest.mark.parametrize("name", [n for n in list_recipes(verb="pretrain") if n != "fashion_mnist"])
def test_a_row_holds_a_short_header_and_only_what_differs(name):
    text = recipe_path(name).read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    tree = yaml.safe_load(text)
    assert text.startswith("# ") and "Run it small" in text, name
    assert len(header[0]) <= 120, header[0]
    assert isinstance(tree["train"]["epochs"], int)  # every recipe states its length (tests/test_fidelity.py)
    if name in BASES:
        assert "base" not in tree
        return
    assert tree["base"] and set(tree) <= {"base", "name", "model", "method", "optim", "train"}, set(tree)
    keys = leaves({k: v for k, v in tree.items() if k not in ("base", "name")})
    assert len(keys) <= 6, keys  # a row's switches and its epochs
    assert len(header) <= 12, len(header)
    chain, path = [], recipe_path(name)
    while "base" in (tree := yaml.safe_load(path.read_text())):
        path = (path.parent / tree["base"]).resolve()
        chain.append(path)
    assert path.relative_to(RECIPES).with_suffix("").as_posix() in BASES and len(chain) <= 3, chain


def test_recipes_verb_lists_every_recipe_with_its_header_line(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list_recipes()
    zero = next(line for line in lines if line.startswith("ablations/table6_filling_zero "))
    assert zero.split(None, 1)[1] == recipe_path("ablations/table6_filling_zero").read_text().splitlines()[0][2:]
    assert main(["recipes", "--filter", "TABLE7A"]) == 0
    assert {line.split()[0] for line in capsys.readouterr().out.splitlines()} == \
        {"mixedae/table7a_mae", "mixedae/table7a_masked_attention"}
    assert main(["recipes", "--filter", "no such row"]) == 1
    assert "no recipe matches 'no such row'" in capsys.readouterr().err


def test_pretrain_takes_a_recipe_name(capsys):
    assert {recipe_path(given).resolve() for given in ("table6_filling_zero", "ablations/table6_filling_zero",
                                                        "configs/ablations/table6_filling_zero.yaml")} == \
        {(RECIPES / "ablations" / "table6_filling_zero.yaml").resolve()}
    assert main(["pretrain", "--config", "ablations/table6_filling_zero", "--print-config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["name"] == "table6_filling_zero" and config["method"]["name"] == "mixmim"
    assert config["method"]["filling"] == "zero" and config["method"]["mask_ratio"] == 0.5  # every value, resolved
    assert config["optim"]["base_lr"] == 1.5e-4  # from its base, ablations/table9_epochs_300
    assert main(["pretrain", "--config", "supp_table3_filling_zero", "--print-config"]) == 2  # removed: a twin
    assert "is not a recipe name (`mixmim recipes` lists them)" in capsys.readouterr().err
