"""Validation of a run config before any work starts: ranges of every section, the method's own checks,
and the model built on the meta device exactly as the run will build it."""

from __future__ import annotations

import re
from typing import Any

from mixmim.config.runs import DetectRunConfig, FinetuneRunConfig, KNNRunConfig, RunConfig, SegmentRunConfig
from mixmim.config.sections import OptimConfig, TrainConfig
from mixmim.utils.typed import ConfigError

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
    config.data.validate()
    if isinstance(config, RunConfig):
        _validate_pretraining(config)
    elif config.checkpoint is None and config.model.name is None:
        raise ConfigError(f"mixmim {config.verb}: give the pretrained weights (checkpoint=..., --checkpoint) or, for a "
                          "randomly initialised baseline, a model name (model.name=..., --model)")
    if config.model.name is not None:
        from mixmim.models.registry import MODELS

        if config.model.name not in MODELS:
            raise ConfigError(f"config key 'model.name': unknown model {config.model.name!r}; known: "
                              f"{', '.join(MODELS)}")
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
    if isinstance(config, DetectRunConfig):
        d = config.detect
        _at_least([("detect.size", d.size, 32), ("detect.max_size", d.max_size, 32), ("detect.fpn_channels",
                   d.fpn_channels, 1), ("detect.detections_per_image", d.detections_per_image, 1),
                   ("detect.rois_per_image", d.rois_per_image, 1)])
        if d.size % 32:
            raise ConfigError(f"config key 'detect.size': {d.size} must be a multiple of 32 (the encoder's stride)")
        if not 0 < d.scale_range[0] <= d.scale_range[1]:
            raise ConfigError(f"config key 'detect.scale_range': {list(d.scale_range)} must satisfy 0 < low <= high")
        if d.anchor_sizes is not None and (len(d.anchor_sizes) != 5 or min(d.anchor_sizes) < 1):
            raise ConfigError(f"config key 'detect.anchor_sizes': {d.anchor_sizes}; expected five positive sizes, "
                              "one per pyramid level")
        if d.detector not in ("mask_rcnn", "cascade_mask_rcnn"):
            raise ConfigError(f"config key 'detect.detector': {d.detector!r}; expected mask_rcnn or "
                              "cascade_mask_rcnn")
    if isinstance(config, SegmentRunConfig):
        g = config.segment
        _at_least([("segment.num_classes", g.num_classes, 2), ("segment.channels", g.channels, 1),
                   ("segment.aux_channels", g.aux_channels, 1), ("segment.aux_weight", g.aux_weight, 0),
                   ("segment.crop_size", g.crop_size, 32), ("segment.stride", g.stride, 1),
                   ("segment.cat_max_ratio", g.cat_max_ratio, 0)])
        if g.crop_size % 32:
            raise ConfigError(f"config key 'segment.crop_size': {g.crop_size} must be a multiple of 32 (the "
                              "encoder's stride)")
        if g.stride is not None and g.stride > g.crop_size:
            raise ConfigError(f"config key 'segment.stride': {g.stride} is larger than the crop {g.crop_size}: "
                              "the windows would leave pixels uncovered")
        if not 0 < g.ratio_range[0] <= g.ratio_range[1] or min(g.scale) < 1:
            raise ConfigError(f"config key 'segment.ratio_range'/'segment.scale': {list(g.ratio_range)} of "
                              f"{list(g.scale)} must be positive with low <= high")
    _at_least([("eval.every_steps", getattr(getattr(config, "eval", None), "every_steps", None), 0)])
    if isinstance(config, KNNRunConfig):
        _at_least([("knn.k", config.knn.k, 1)])
        if config.knn.temperature <= 0:
            raise ConfigError(f"config key 'knn.temperature': {config.knn.temperature} must be positive")


def _validate_train(t: TrainConfig) -> None:
    _at_least([("train.epochs", t.epochs, 1), ("train.batch_size", t.batch_size, 1), ("train.accum_steps",
                                                                                      t.accum_steps, 1),
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
