"""Recipes and how a run config is loaded: YAML files shipped with the package, addressable by name, each
holding only what differs from the file its ``base:`` names; the verb's defaults, a preset, the recipe and
dotted ``section.key=value`` overrides merged into one tree, built into the verb's typed root and
validated. No torch."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from mixmim.config import validation
from mixmim.config.runs import VERB_CONFIGS, VERB_DEFAULTS, RunConfig
from mixmim.utils.typed import ConfigError, apply_overrides, build_dataclass, merge, read_yaml

# ---------------------------------------------------------------------------------------------------
# recipes: YAML files shipped with the package, addressable by name, each holding only what differs
# from the file named by its ``base:`` key

RECIPES = Path(__file__).resolve().parents[1] / "configs"


# Recipes of the transfer verbs live in a folder named after their verb; every other one pretrains.
TRANSFER_RECIPES = ("finetune", "linprobe", "detect", "segment")


def recipe_verb(name: str) -> str:
    """The verb a packaged recipe is for (``finetune/mae_vit_base_100ep`` -> ``finetune``)."""
    top = name.split("/", 1)[0]
    return top if top in TRANSFER_RECIPES and "/" in name else "pretrain"


def list_recipes(folder: str | None = None, verb: str | None = None) -> list[str]:
    """Names of the packaged recipes (``ablations/table6_filling_zero``, ...), study files excluded
    unless ``folder`` names them; ``verb``: only the recipes of that verb."""
    root = RECIPES / folder if folder else RECIPES
    names = [p.relative_to(RECIPES).with_suffix("").as_posix() for p in sorted(root.rglob("*.yaml"))]
    names = [n for n in names if folder or not n.startswith("study/")]
    return [n for n in names if verb is None or recipe_verb(n) == verb]


def recipe_path(name_or_path: str | Path) -> Path:
    """The YAML file a ``--config`` value means: an existing path, else a packaged recipe by its name
    (``mixmim_base_in1k``, ``simmim/swin_base_192_100ep``, with or without ``.yaml``) or by a file
    name that only one recipe has."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    text = str(name_or_path).removesuffix(".yaml")
    for prefix in ("configs/", "src/mixmim/configs/"):
        text = text.removeprefix(prefix)
    exact = RECIPES / f"{text}.yaml"
    if exact.is_file():
        return exact
    matches = [RECIPES / f"{n}.yaml" for n in list_recipes() if n.rsplit("/", 1)[-1] == text]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        names = ", ".join(str(m.relative_to(RECIPES).with_suffix("")) for m in matches)
        raise ConfigError(f"config {name_or_path!r} names {len(matches)} recipes: {names}; give one of them")
    raise ConfigError(f"config file {name_or_path} does not exist and is not a recipe name (`mixmim recipes` "
                      "lists them)")


def read_recipe(name_or_path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe's tree with its ``base:`` chain resolved: the base (a path relative to the recipe, or a
    recipe name) is read first and the recipe's keys are merged onto it, section by section."""
    path = recipe_path(name_or_path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"config file {path}: its base chain loops ({chain})")
    tree = read_yaml(path)
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: 'base' must name one file, got {base!r}")
    relative = path.parent / base
    parent = read_recipe(relative if relative.is_file() else base, (*_seen, path))
    return merge_trees(parent, tree)


def merge_trees(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` onto ``base``, sections merged key by key. A model of another name does not inherit
    the base model's keys (windows, depths ... belong to that model), except its input size."""
    base = copy.deepcopy(base)
    base_model = base.get("model") or {}
    if isinstance(override.get("model"), dict) and "name" in override["model"] \
            and override["model"]["name"] != base_model.get("name"):
        base["model"] = {k: v for k, v in base_model.items() if k == "img_size"}
    return merge(base, override)




def resolve_tree(verb: str, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                 base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The verb's defaults, then ``base`` (a preset such as :data:`DEMO`), then the recipe, then the
    overrides, as one plain tree."""
    if verb not in VERB_CONFIGS:
        raise ConfigError(f"unknown verb {verb!r}; known: {', '.join(VERB_CONFIGS)}")
    user = read_recipe(path) if path is not None else {}
    user = apply_overrides(user, list(overrides))
    return merge_trees(merge_trees(VERB_DEFAULTS[verb], base or {}), user)


def load_run_config(verb: str, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                    base: dict[str, Any] | None = None, tree: dict[str, Any] | None = None):
    """Any verb's validated run config from its recipe (a path or a recipe name) and overrides, or from
    an already resolved ``tree``."""
    tree = resolve_tree(verb, path, overrides, base) if tree is None else tree
    config = build_dataclass(VERB_CONFIGS[verb], tree)
    validation.validate(config)
    return config


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict[str, Any] | None = None) -> RunConfig:
    """YAML file or recipe name (optional) + dotted overrides -> validated pretraining
    :class:`RunConfig`. ``base`` is the tree the file is merged onto (``DEMO`` for the command line
    without ``--config``)."""
    return load_run_config("pretrain", path, overrides, base)


def dump_config(config: Any) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
