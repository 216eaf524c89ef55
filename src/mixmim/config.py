"""Run configuration: typed dataclasses, one per layer, loaded from YAML and dotted overrides.

    name: demo
    model:  {name: mixmim_tiny, img_size: 224}
    method: {name: mixmim, mask_ratio: 0.5}     # + fields of that method's config dataclass
    data:   {source: bundled}
    optim:  {base_lr: 1.5e-4}
    train:  {epochs: 10, batch_size: 32}

Every key is checked against the dataclasses before any work starts: an unknown key or a value of the
wrong type stops the run with one line naming the key, the value and what is expected.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


@dataclass
class ModelConfig:
    """The encoder: a named configuration plus optional overrides (None keeps the named value).
    ``options`` passes any other constructor argument of the model's family (e.g. ``depth`` of a
    ViT, ``window_size`` of a Swin, ``width_factor`` of a ResNet)."""

    name: str = "mixmim_tiny"
    img_size: int = 224
    patch_size: int | None = None
    embed_dim: int | None = None
    depths: list[int] | None = None
    num_heads: list[int] | int | None = None
    window_size: list[int | list[int]] | int | None = None
    mlp_ratio: float | None = None
    drop_path_rate: float = 0.0
    attention_impl: Literal["auto", "reference", "fast", "flex"] | None = None
    learnable_pos_embed: bool | None = None
    options: dict[str, Any] = field(default_factory=dict)
    grad_checkpointing: bool = False
    compile: bool = False

    def encoder_overrides(self) -> dict[str, Any]:
        keys = ("img_size", "patch_size", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio",
                "drop_path_rate", "attention_impl", "learnable_pos_embed")
        return {**{k: getattr(self, k) for k in keys if getattr(self, k) is not None}, **self.options}


@dataclass
class DataConfig:
    """Where images come from and how they are augmented (MixMIM section 8: RandomResizedCrop, flip)."""

    source: Literal["bundled", "folder", "fashion_mnist"] = "bundled"
    path: str | None = None
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    bundled_epoch_size: int = 512
    max_bad_fraction: float = 0.01


@dataclass
class OptimConfig:
    """AdamW with warmup then cosine, per iteration (MixMIM Table 11). ``schedule: step`` holds the
    peak after the warm-up and multiplies it by ``step_gamma`` at each of ``step_fractions`` of the
    run (SimMIM section 4.3: [0.875] and 0.1; appendix B: [0.9, 0.95]); ``min_lr`` is for cosine."""

    base_lr: float = 1.5e-4
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 40.0
    warmup_steps: int | None = None
    clip_grad: float | None = None
    fused: bool | None = None
    schedule: Literal["cosine", "step"] = "cosine"
    step_fractions: list[float] = field(default_factory=lambda: [0.875])
    step_gamma: float = 0.1


@dataclass
class MonitorConfig:
    """``train.monitor``: what the representation monitor (:mod:`mixmim.training.monitor`) evaluates
    and how often (``data`` None: off)."""

    data: str | None = None  # "fashion_mnist" or a folder with one sub-folder per class
    every: int = 0  # steps between evaluations; 0: ten evaluations over the run
    train_size: int = 5000  # labelled images of the k-NN bank and the probe's training set
    test_size: int = 1000  # held-out images scored
    k: int = 20
    temperature: float = 0.07
    linprobe: bool = False
    linprobe_epochs: int = 20
    batch_size: int = 256
    at_start: bool = True  # evaluate the initial (random) encoder as the baseline
    crop_pct: float = 1.0  # Fashion-MNIST and small images: no centre crop


@dataclass
class TrainConfig:
    epochs: int = 600
    max_steps: int | None = None
    batch_size: int = 1024
    accum_steps: int = 1
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    device: str = "auto"
    seed: int = 0
    num_workers: int = 8
    pin_memory: bool = True
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    picture_every: int = 0
    distributed: Literal["ddp", "fsdp"] = "ddp"
    progress: bool = True
    nan_patience: int = 3
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


@dataclass
class RunConfig:
    name: str = "mixmim"
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "mixmim"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def method_name(self) -> str:
        return str(self.method.get("name", "mixmim"))

    def method_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.method.items() if k != "name"}

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


# ---------------------------------------------------------------------------------------------------
# typed conversion

def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (lists to tuples, ints to floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    fail = ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, key)
            except ConfigError:
                continue
        raise fail
    if origin is Literal:
        if value in args:
            return value
        raise fail
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail
        return build_dataclass(tp, value, key)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail
        return dict(value)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}': expected {len(args)} values, got {value!r}")
            return tuple(convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads "1e-3" (no dot) as a string; users mean the number.
            try:
                return float(value)
            except ValueError:
                pass
        raise fail
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail
    return value


def build_dataclass(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate ``cls`` from a dict, checking every key and value; errors name the dotted key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}'; known keys here: {', '.join(sorted(names))}")
        kwargs[key] = convert(value, hints[key], dotted)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.subkey=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse value ({exc.__class__.__name__})") from None
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return tree


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(tree).__name__}")
    return tree


# ---------------------------------------------------------------------------------------------------
# recipes: YAML files shipped with the package, addressable by name, each holding only what differs
# from the file named by its ``base:`` key

RECIPES = Path(__file__).resolve().parent / "configs"


def list_recipes(folder: str | None = None) -> list[str]:
    """Names of the packaged recipes (``ablations/table6_filling_zero``, ...), study files excluded
    unless ``folder`` names them."""
    root = RECIPES / folder if folder else RECIPES
    names = [p.relative_to(RECIPES).with_suffix("").as_posix() for p in sorted(root.rglob("*.yaml"))]
    return [n for n in names if folder or not n.startswith("study/")]


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
        raise ConfigError(f"config {name_or_path!r} names {len(matches)} recipes: "
                          f"{', '.join(str(m.relative_to(RECIPES).with_suffix('')) for m in matches)}; give one of them")
    raise ConfigError(f"config file {name_or_path} does not exist and is not a recipe name (`mixmim recipes` lists them)")


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
    return _merge(base, override)


# What ``mixmim pretrain`` runs with no --config: mixmim_tiny on the bundled photos, a few minutes on a
# laptop CPU. At 128 px the stage maps are 32/16/8/4, so windows 16/16 then global attention. The
# learning rate follows the small-run rule (docs/study: peak 1e-3 whatever the batch up to 64, 10%
# warm-up, cosine): the papers' 1.5e-4 x batch / 256 is 9e-6 at batch 16, far too small for a run of
# minutes, and rates a few times higher than 1e-3 make the representation worse (the monitor shows it).
DEMO: dict[str, Any] = {
    "name": "demo",
    "model": {"name": "mixmim_tiny", "img_size": 128, "window_size": [16, 16, 8, 4]},
    "method": {"name": "mixmim"},
    "data": {"source": "bundled", "bundled_epoch_size": 512},
    "optim": {"lr": 1e-3, "warmup_steps": 20},
    "train": {"epochs": 7, "max_steps": 200, "batch_size": 16, "num_workers": 2, "checkpoint_every": 50,
              "log_every": 5, "keep_checkpoints": 2},
}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict[str, Any] | None = None) -> RunConfig:
    """YAML file or recipe name (optional) + dotted overrides -> validated :class:`RunConfig`. ``base``
    is the tree the file is merged onto (``DEMO`` for the command line without ``--config``)."""
    user = read_recipe(path) if path is not None else {}
    user = apply_overrides(user, list(overrides))
    tree = merge_trees(base or {}, user)
    config = build_dataclass(RunConfig, tree)
    config.method = {"name": config.method.get("name", "mixmim"), **config.method_options()}
    validate(config)
    return config


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate(config: RunConfig) -> None:
    """Range checks and the method's own options, before any work starts."""
    from mixmim.methods.factory import METHODS
    from mixmim.models.registry import MODELS

    t, o, d = config.train, config.optim, config.data
    if config.model.name not in MODELS:
        raise ConfigError(f"config key 'model.name': unknown model {config.model.name!r}; known: {', '.join(MODELS)}")
    if config.method_name() not in METHODS:
        raise ConfigError(f"config key 'method.name': unknown method {config.method_name()!r}; "
                          f"known: {', '.join(METHODS)}")
    method_cfg = build_dataclass(METHODS[config.method_name()][0], config.method_options(), "method")
    if hasattr(method_cfg, "validate"):
        try:
            method_cfg.validate()
        except ValueError as exc:
            raise ConfigError(f"config section 'method': {exc}") from None
    for key, value, low in [("train.epochs", t.epochs, 1), ("train.batch_size", t.batch_size, 1),
                            ("train.accum_steps", t.accum_steps, 1), ("train.checkpoint_every", t.checkpoint_every, 1),
                            ("train.keep_checkpoints", t.keep_checkpoints, 1), ("train.log_every", t.log_every, 1),
                            ("train.num_workers", t.num_workers, 0), ("model.img_size", config.model.img_size, 16)]:
        if value < low:
            raise ConfigError(f"config key '{key}': {value} is below the minimum {low}")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"config key 'train.max_steps': {t.max_steps} must be at least 1 (or null)")
    if t.batch_size % t.accum_steps:
        raise ConfigError(f"config key 'train.batch_size': {t.batch_size} is not divisible by "
                          f"train.accum_steps={t.accum_steps}")
    if o.base_lr <= 0 or (o.lr is not None and o.lr <= 0):
        raise ConfigError("config key 'optim.base_lr'/'optim.lr': the learning rate must be positive")
    if not (0 <= o.betas[0] < 1 and 0 <= o.betas[1] < 1):
        raise ConfigError(f"config key 'optim.betas': {list(o.betas)} must lie in [0, 1)")
    if not (0 < d.crop_scale[0] <= d.crop_scale[1] <= 1):
        raise ConfigError(f"config key 'data.crop_scale': {list(d.crop_scale)} must satisfy 0 < low <= high <= 1")
    if not 0 <= d.max_bad_fraction <= 1:
        raise ConfigError(f"config key 'data.max_bad_fraction': {d.max_bad_fraction} must lie in [0, 1]")
    if d.source == "folder" and not d.path:
        raise ConfigError("config key 'data.path': data.source=folder needs the image folder's path")
    _check_buildable(config)


def _check_buildable(config: RunConfig) -> None:
    """Build the model on the meta device (no memory, milliseconds) so that window sizes that do not
    fit the feature maps, head counts that do not divide the width, etc. fail before any work."""
    import torch

    from mixmim.methods.factory import create_pretrainer

    try:
        with torch.device("meta"):
            method = create_pretrainer(method=config.method_name(), model=config.model.name,
                                       **config.model.encoder_overrides(), **config.method_options())
    except (ValueError, TypeError, AssertionError) as exc:
        if str(exc).startswith("img_size="):
            raise ConfigError(f"config key 'model.img_size': {exc}") from None
        raise ConfigError(f"config sections 'model'/'method' ({config.model.name}, {config.method_name()}): "
                          f"{exc}") from None
    multiple = int(getattr(method, "batch_multiple", 1))
    micro = config.train.batch_size // config.train.accum_steps
    if micro % multiple:
        raise ConfigError(f"config key 'train.batch_size': {config.method_name()} mixes groups of {multiple} images, "
                          f"so every micro-batch must be a multiple of {multiple}; batch {config.train.batch_size} / "
                          f"accum_steps {config.train.accum_steps} = {micro}")


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
