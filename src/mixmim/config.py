"""Run configuration for every verb: typed dataclasses, one per section, loaded from YAML recipes (which
may name a ``base:`` recipe and hold only what differs) and dotted ``section.key=value`` overrides.

    name: demo
    model:  {name: mixmim_tiny, img_size: 224}
    method: {name: mixmim, mask_ratio: 0.5}     # pretraining: + fields of that method's config dataclass
    data:   {source: bundled}
    optim:  {base_lr: 1.5e-4}
    train:  {epochs: 10, batch_size: 32}

The sections ``model``, ``data``, ``optim`` and ``train`` are shared by every verb (pretrain, finetune,
linprobe, knn, segment); each verb adds its own (``method``; ``finetune`` and ``eval``; ``probe``;
``knn``; ``segment``) and its own defaults (:data:`VERB_DEFAULTS`). Every key is checked before any
work starts: an unknown key or a value of the wrong type stops the run with one line naming the key,
the value and what is expected. Nothing here imports torch.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from mixmim.methods.options import MethodOptions, MixMIMConfig
from mixmim.utils.imagenet import IMAGENET_MEAN, IMAGENET_STD
from mixmim.utils.typed import ConfigError, apply_overrides, build_dataclass, merge, plain, read_yaml

__all__ = ["ConfigError", "build_dataclass", "read_yaml", "load_config", "load_run_config", "dump_config"]


# ---------------------------------------------------------------------------------------------------
# sections shared by every verb

@dataclass
class ModelConfig:
    """The encoder: a named configuration plus optional overrides (None keeps the named value; for the
    transfer verbs ``name``/``img_size``/``window_size`` None mean the checkpoint's, and
    ``drop_path_rate`` None the model's fine-tuning default, MixMIM section 3). ``options`` passes any
    other constructor argument of the model's family (e.g. ``depth`` of a ViT, ``window_size`` of a
    Swin, ``width_factor`` of a ResNet)."""

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
class TransferModelConfig(ModelConfig):
    """``model`` of the transfer verbs: None (the default of ``name``, ``img_size``) takes the
    checkpoint's value, and None ``drop_path_rate`` the model's fine-tuning default."""

    name: str | None = None
    img_size: int | None = None
    drop_path_rate: float | None = None


@dataclass
class DataConfig:
    """Where images come from and how they are augmented (MixMIM section 8: RandomResizedCrop, flip).

    ``source``: ``bundled`` (the photos inside scikit-image), ``folder`` (``path``, recursively; class
    sub-folders for the labelled verbs; a folder of WebDataset ``.tar`` shards or a Hugging Face
    dataset at ``path`` is detected), ``shards``, ``hf`` (say which), ``stream`` (sequential shard
    streaming, pretraining only), ``fashion_mnist`` (docs/data.md says which to pick for which
    storage). ``channels``: 1 (grey) or 3; ``normalize``: ``imagenet`` (its grey values for one
    channel), ``dataset`` (measured over ``stats_samples`` images) or ``none``, unless ``mean``/``std``
    are set; ``draft``: decode JPEGs at reduced scale when the crop keeps ``draft_margin`` source
    pixels per output pixel; ``decode``: ``gpu`` decodes JPEGs on the GPU (opt-in, falls back to the
    CPU with one warning). Labelled verbs (finetune, linprobe, knn,
    segment, the pretraining monitor) evaluate on ``val_path``, else ``path/val`` or ``path/test``,
    else a seeded, per-class ``val_fraction`` of ``path``; ``limit_train``/``limit_test`` take seeded
    subsets (``balanced``: the same count per class); ``crop_pct``: evaluation resize = size / crop_pct."""

    source: Literal["bundled", "folder", "shards", "hf", "stream", "fashion_mnist"] = "bundled"
    path: str | None = None
    channels: Literal[1, 3] = 3
    normalize: Literal["imagenet", "dataset", "none"] = "imagenet"
    stats_samples: int = 10000
    draft: bool = True
    draft_margin: float = 2.0
    decode: Literal["cpu", "gpu"] = "cpu"
    hf_image_column: str = "image"
    hf_label_column: str = "label"
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True  # random horizontal flips, in pretraining and in finetune/linprobe training
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    bundled_epoch_size: int = 512
    max_bad_fraction: float = 0.01
    val_path: str | None = None
    val_fraction: float = 0.2
    limit_train: int | None = None
    limit_test: int | None = None
    balanced: bool = False
    crop_pct: float = 0.875


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule, set every iteration.

    ``lr`` (absolute) or ``base_lr`` x global batch / ``lr_batch_divisor`` (256: MAE, MixMIM Table 11;
    512: SimMIM's code, which scales ``min_lr`` and ``warmup_lr`` the same way when
    ``scale_lr_bounds``). Linear warm-up from ``warmup_lr`` over ``warmup_steps`` (or
    ``warmup_epochs``), then ``schedule``: ``cosine`` to ``min_lr`` (``cosine_after_warmup``: the
    half-cosine starts after the warm-up, as MAE's code; False: it spans the whole run with the
    warm-up inside it, as SimMIM's code through timm), ``step`` (the peak times ``step_gamma`` at each
    of ``step_fractions`` of the run: SimMIM section 4.3, appendix B) or ``poly`` (linear decay to
    ``min_lr``: BEiT's segmentation schedule). The warm-up starts at ``warmup_lr``: 0 in MAE's
    ``lr_sched`` and the MixMIM release (which keeps it); SimMIM's code has its own ``WARMUP_LR``.

    ``name``: ``adamw`` (``betas``), ``sgd`` or ``lars`` (``momentum``; MAE's linear probe).
    ``layer_decay``: layer-wise lr decay for fine-tuning (None: off), by the encoder's own layer ids
    (``layer_decay_rule: auto``: the MixMIM release's for MixMIM encoders, timm's elsewhere) or by
    SimMIM's code (``simmim``: Swin's patch merging counted with the stage before it, the final norm
    and head at full rate)."""

    name: Literal["adamw", "sgd", "lars"] = "adamw"
    base_lr: float = 1.5e-4
    lr: float | None = None
    lr_batch_divisor: int = 256
    min_lr: float = 0.0
    warmup_lr: float = 0.0
    scale_lr_bounds: bool = False
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    momentum: float = 0.9
    warmup_epochs: float = 40.0
    warmup_steps: int | None = None
    clip_grad: float | None = None
    fused: bool | None = None
    schedule: Literal["cosine", "step", "poly"] = "cosine"
    cosine_after_warmup: bool = True
    step_fractions: list[float] = field(default_factory=lambda: [0.875])
    step_gamma: float = 0.1
    layer_decay: float | None = None
    layer_decay_rule: Literal["auto", "simmim"] = "auto"


@dataclass
class MonitorConfig:
    """``train.monitor``: what the representation monitor (:mod:`mixmim.training.monitor`) evaluates
    during pretraining and how often (``data`` None: off)."""

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
    """The loop: ``batch_size`` is the global batch (split over the processes of torchrun, then into
    ``accum_steps`` micro-batches); ``epochs`` and ``max_steps`` bound the run; the rest is
    run-time (precision, workers, checkpoints, logs, trackers)."""

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
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


# ---------------------------------------------------------------------------------------------------
# sections of one verb

@dataclass
class FinetuneConfig:
    """``finetune``: supervised fine-tuning (MixMIM Table 12: RandAug(9, 0.5), Mixup 0.8, CutMix 1.0,
    label smoothing 0.1, random erasing 0.25). ``rule: small_data`` fills every key the user did not
    set from the size of the labelled set (:mod:`mixmim.transfer.small_data`, docs/transfer.md).
    ``head_init``: ``trunc_normal`` with ``head_init_std`` (MAE's 2e-5: the pretrained features lead at
    the start) or ``probe`` (the head starts as a linear probe fitted on frozen features for
    ``probe_epochs`` and at least ``probe_steps`` optimiser steps, LP-FT: on a few hundred images 20 epochs
    are 40 steps, and a head that far from the probe's optimum starts fine-tuning below the probe)."""

    rule: Literal["small_data", "none"] = "none"
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    color_jitter: float | None = None  # None: off, as in MAE's fine-tuning code (timm's 0.4 is not theirs)
    head_init: Literal["trunc_normal", "probe"] = "trunc_normal"
    head_init_std: float = 2e-5
    probe_epochs: int = 20
    probe_steps: int = 1000


@dataclass
class EvalConfig:
    """``eval``: evaluation on the held-out split every ``every_epochs`` epochs (0: after the last one)
    and which weights the run reports and keeps: ``last`` (default; no choice made on the evaluation
    split) or ``best`` (the epoch with the highest top-1 / mIoU on the evaluation split, as the
    MAE, MixMIM and SimMIM fine-tuning codes print as "Max accuracy": that is a choice on the split
    the number is reported on)."""

    every_epochs: int = 1
    select: Literal["last", "best"] = "last"
    batch_size: int | None = None  # None: the training micro-batch


@dataclass
class ProbeConfig:
    """``probe``: MAE's linear probe (BatchNorm without affine + linear on the frozen pooled features).
    ``features: augmented`` runs the frozen encoder on every augmented training image (MAE's recipe);
    ``cached`` extracts the features of both splits once with the evaluation transform (minutes
    instead of hours on a CPU; what the study and quick checks use)."""

    features: Literal["augmented", "cached"] = "augmented"


@dataclass
class KNNConfig:
    """``knn``: weighted k-NN of the frozen pooled features (cosine, votes exp(cos / T))."""

    k: int = 20
    temperature: float = 0.07


@dataclass
class SegmentConfig:
    """``segment``: UperNet on the encoder (MixMIM section 3; BEiT's recipe). ``num_classes`` None:
    1 + the largest label in the masks; label 255 is ignored."""

    num_classes: int | None = None
    channels: int = 512


# ---------------------------------------------------------------------------------------------------
# one root per verb

@dataclass
class _Run:
    verb: ClassVar[str] = ""

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))


@dataclass
class RunConfig(_Run):
    """``mixmim pretrain``."""

    verb: ClassVar[str] = "pretrain"
    name: str = "mixmim"
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodOptions = field(default_factory=MixMIMConfig)  # `name` picks the method (methods/options.py)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def method_name(self) -> str:
        return self.method.name

    def method_options(self) -> dict[str, Any]:
        """The method's options as set (decoder sizes and SimMIM's pixel statistics left at None are
        resolved when the method is built)."""
        return {k: v for k, v in dataclasses.asdict(self.method).items() if k != "name"}


@dataclass
class FinetuneRunConfig(_Run):
    """``mixmim finetune``: ``checkpoint`` is a run folder, a training checkpoint, an export or a release
    checkpoint (None with ``model.name``: a randomly initialised encoder, the baseline)."""

    verb: ClassVar[str] = "finetune"
    name: str = "finetune"
    output_dir: str = "runs"
    checkpoint: str | None = None
    model: TransferModelConfig = field(default_factory=TransferModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class ProbeRunConfig(_Run):
    """``mixmim linprobe``."""

    verb: ClassVar[str] = "linprobe"
    name: str = "linprobe"
    output_dir: str = "runs"
    checkpoint: str | None = None
    model: TransferModelConfig = field(default_factory=TransferModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class KNNRunConfig(_Run):
    """``mixmim knn`` (``train`` gives the batch for feature extraction, the device and the workers)."""

    verb: ClassVar[str] = "knn"
    name: str = "knn"
    output_dir: str = "runs"
    checkpoint: str | None = None
    model: TransferModelConfig = field(default_factory=TransferModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)


@dataclass
class SegmentRunConfig(_Run):
    """``mixmim segment``: ``data.path`` holds ``images/`` and ``masks/`` (PNG label maps)."""

    verb: ClassVar[str] = "segment"
    name: str = "segment"
    output_dir: str = "runs"
    checkpoint: str | None = None
    model: TransferModelConfig = field(default_factory=TransferModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


VERB_CONFIGS: dict[str, type] = {c.verb: c for c in (RunConfig, FinetuneRunConfig, ProbeRunConfig, KNNRunConfig,
                                                     SegmentRunConfig)}

# What each verb starts from before its recipe: the papers' settings where the verb has one recipe
# (fine-tuning: MixMIM Table 12; linear probing: a quick probe on cached features, MAE's recipe is
# configs/linprobe/), the run-time settings a transfer run on one machine needs.
VERB_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": {},
    "finetune": {
        "data": {"source": "folder", "crop_scale": [0.08, 1.0]},
        "optim": {"base_lr": 5e-4, "betas": [0.9, 0.999], "weight_decay": 0.05, "layer_decay": 0.7,
                  "warmup_epochs": 5, "min_lr": 1e-6, "warmup_lr": 0.0},
        "train": {"epochs": 100, "batch_size": 1024, "num_workers": 4, "log_every": 10},
    },
    "linprobe": {
        "model": {"drop_path_rate": 0.0},
        "data": {"source": "folder", "crop_scale": [0.08, 1.0]},
        "optim": {"name": "sgd", "base_lr": 0.1, "weight_decay": 0.0, "momentum": 0.9, "warmup_epochs": 10,
                  "min_lr": 0.0, "warmup_lr": 0.0},
        "train": {"epochs": 90, "batch_size": 256, "num_workers": 4, "log_every": 10},
        "probe": {"features": "cached"},
    },
    "knn": {
        "model": {"drop_path_rate": 0.0},
        "data": {"source": "folder"},
        "train": {"batch_size": 128, "num_workers": 4},
    },
    "segment": {
        "model": {"drop_path_rate": 0.1},
        "data": {"source": "folder"},
        "optim": {"lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.05, "layer_decay": 0.85, "schedule": "poly",
                  "warmup_steps": 50, "warmup_lr": 0.0},
        "train": {"epochs": 20, "batch_size": 8, "num_workers": 4, "log_every": 10},
    },
}


# ---------------------------------------------------------------------------------------------------
# recipes: YAML files shipped with the package, addressable by name, each holding only what differs
# from the file named by its ``base:`` key

RECIPES = Path(__file__).resolve().parent / "configs"


# Recipes of the transfer verbs live in a folder named after their verb; every other one pretrains.
TRANSFER_RECIPES = ("finetune", "linprobe")


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
    return merge(base, override)


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
    validate(config)
    return config


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict[str, Any] | None = None) -> RunConfig:
    """YAML file or recipe name (optional) + dotted overrides -> validated pretraining
    :class:`RunConfig`. ``base`` is the tree the file is merged onto (``DEMO`` for the command line
    without ``--config``)."""
    return load_run_config("pretrain", path, overrides, base)


# ---------------------------------------------------------------------------------------------------
# validation: ranges and the method's own options, before any work starts

def _at_least(pairs: list[tuple[str, Any, float]]) -> None:
    for key, value, low in pairs:
        if value is not None and value < low:
            raise ConfigError(f"config key '{key}': {value} is below the minimum {low}")


def validate(config: Any) -> None:
    """Range checks for every verb; the model and the method for pretraining."""
    _validate_train(config.train)
    if hasattr(config, "optim"):
        _validate_optim(config.optim)
    _validate_data(config.data)
    if isinstance(config, RunConfig):
        _validate_pretraining(config)
    elif config.checkpoint is None and config.model.name is None:
        raise ConfigError(f"mixmim {config.verb}: give the pretrained weights (checkpoint=..., --checkpoint) or, for a "
                          "randomly initialised baseline, a model name (model.name=..., --model)")
    if config.model.name is not None:
        from mixmim.models.registry import MODELS

        if config.model.name not in MODELS:
            raise ConfigError(f"config key 'model.name': unknown model {config.model.name!r}; known: {', '.join(MODELS)}")
    if isinstance(config, FinetuneRunConfig):
        f = config.finetune
        _at_least([("finetune.mixup", f.mixup, 0), ("finetune.cutmix", f.cutmix, 0), ("finetune.re_prob", f.re_prob, 0),
                   ("finetune.probe_epochs", f.probe_epochs, 1),
                   ("finetune.probe_steps", f.probe_steps, 1)])
        if not 0 <= f.smoothing < 1:
            raise ConfigError(f"config key 'finetune.smoothing': {f.smoothing} must lie in [0, 1)")
    if hasattr(config, "eval"):
        _at_least([("eval.every_epochs", config.eval.every_epochs, 0), ("eval.batch_size", config.eval.batch_size, 1)])
    if not isinstance(config, RunConfig) and config.model.img_size is not None:
        _at_least([("model.img_size", config.model.img_size, 16)])
    if isinstance(config, SegmentRunConfig):
        _at_least([("segment.num_classes", config.segment.num_classes, 2), ("segment.channels", config.segment.channels, 1)])
    if isinstance(config, KNNRunConfig):
        _at_least([("knn.k", config.knn.k, 1)])
        if config.knn.temperature <= 0:
            raise ConfigError(f"config key 'knn.temperature': {config.knn.temperature} must be positive")


def _validate_train(t: TrainConfig) -> None:
    _at_least([("train.epochs", t.epochs, 1), ("train.batch_size", t.batch_size, 1), ("train.accum_steps", t.accum_steps, 1),
               ("train.checkpoint_every", t.checkpoint_every, 1), ("train.keep_checkpoints", t.keep_checkpoints, 1),
               ("train.log_every", t.log_every, 1), ("train.num_workers", t.num_workers, 0),
               ("train.max_steps", t.max_steps, 1), ("train.nan_patience", t.nan_patience, 1)])
    if t.batch_size % t.accum_steps:
        raise ConfigError(f"config key 'train.batch_size': {t.batch_size} is not divisible by "
                          f"train.accum_steps={t.accum_steps}")
    if not re.fullmatch(r"auto|cpu|mps|meta|(cuda|xpu|hpu)(:\d+)?", str(t.device)):
        raise ConfigError(f"config key 'train.device': {t.device!r} is not a device; expected auto, cpu, cuda, cuda:N, "
                          "mps or xpu")
    known = ("tensorboard", "csv", "wandb", "mlflow")
    for name in t.trackers:
        if name not in known:
            raise ConfigError(f"config key 'train.trackers': unknown tracker {name!r}; known: {', '.join(known)}")


def _validate_optim(o: OptimConfig) -> None:
    if o.base_lr <= 0 or (o.lr is not None and o.lr <= 0):
        raise ConfigError("config key 'optim.base_lr'/'optim.lr': the learning rate must be positive")
    if not (0 <= o.betas[0] < 1 and 0 <= o.betas[1] < 1):
        raise ConfigError(f"config key 'optim.betas': {list(o.betas)} must lie in [0, 1)")
    if o.layer_decay is not None and not 0 < o.layer_decay <= 1:
        raise ConfigError(f"config key 'optim.layer_decay': {o.layer_decay} must lie in (0, 1] (or null: off)")
    _at_least([("optim.lr_batch_divisor", o.lr_batch_divisor, 1), ("optim.warmup_steps", o.warmup_steps, 0),
               ("optim.warmup_epochs", o.warmup_epochs, 0), ("optim.min_lr", o.min_lr, 0),
               ("optim.warmup_lr", o.warmup_lr, 0)])
    if o.schedule == "step":
        try:
            check_steps(o.step_fractions, o.step_gamma)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def check_steps(fractions: Any, gamma: float) -> None:
    """A step schedule's milestones must be increasing fractions of the run in (0, 1], its factor in (0, 1]."""
    values = [float(f) for f in fractions]
    if not values or any(not 0.0 < f <= 1.0 for f in values) or values != sorted(set(values)):
        raise ValueError(f"optim.step_fractions={list(fractions)}: expected increasing fractions of the run in (0, 1]")
    if not 0.0 < float(gamma) <= 1.0:
        raise ValueError(f"optim.step_gamma={gamma}: expected a factor in (0, 1]")


def _validate_data(d: DataConfig) -> None:
    if not (0 < d.crop_scale[0] <= d.crop_scale[1] <= 1):
        raise ConfigError(f"config key 'data.crop_scale': {list(d.crop_scale)} must satisfy 0 < low <= high <= 1")
    if not 0 <= d.max_bad_fraction <= 1:
        raise ConfigError(f"config key 'data.max_bad_fraction': {d.max_bad_fraction} must lie in [0, 1]")
    if not 0 < d.val_fraction < 1:
        raise ConfigError(f"config key 'data.val_fraction': {d.val_fraction} must lie in (0, 1)")
    if not 0 < d.crop_pct <= 1:
        raise ConfigError(f"config key 'data.crop_pct': {d.crop_pct} must lie in (0, 1]")
    if len(d.mean) != len(d.std) or min(d.std) <= 0:
        raise ConfigError(f"config keys 'data.mean'/'data.std': {list(d.mean)} / {list(d.std)} need one value per "
                          "channel each, positive deviations")
    _at_least([("data.limit_train", d.limit_train, 1), ("data.limit_test", d.limit_test, 1)])
    if d.source == "folder" and not d.path:
        raise ConfigError("config key 'data.path': data.source=folder needs the image folder's path")


def _validate_pretraining(config: RunConfig) -> None:
    from mixmim.models.registry import MODELS

    if config.model.name not in MODELS:
        raise ConfigError(f"config key 'model.name': unknown model {config.model.name!r}; known: {', '.join(MODELS)}")
    if config.model.img_size is None or config.model.img_size < 16:
        raise ConfigError(f"config key 'model.img_size': {config.model.img_size} is below the minimum 16")
    try:
        config.method.validate()
    except ValueError as exc:
        raise ConfigError(f"config section 'method': {exc}") from None
    _check_buildable(config)


def _check_buildable(config: RunConfig) -> None:
    """Build the method on the meta device (no memory, milliseconds), exactly as the run will
    (:func:`mixmim.methods.factory.build_method`), so that window sizes that do not fit the feature
    maps, head counts that do not divide the width, etc. fail before any work."""
    import torch

    from mixmim.methods.factory import build_method

    try:
        with torch.device("meta"):
            method = build_method(config)
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


def dump_config(config: Any) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
