"""The small-data rule for fine-tuning: what ``mixmim finetune`` runs when no paper recipe is asked for.

The papers' recipe (MixMIM Table 12) is for 1.28 million images and 100 epochs: at batch 1024 and
base lr 5e-4 with a near-zero head, mixup and RandAugment, a set of a few hundred images gets a few
hundred steps at a learning rate too small to train the head, and fine-tuning ends below a linear
probe of the same encoder. The rule sets, from the number of labelled training images N, the keys
the user did not set (docs/transfer.md "A small labelled set"). What it gives is measured by
docs/scripts/finetune_sweep.py (docs/study/finetune_sweep), one change at a time:

- batch: N / 64, rounded down to a power of two, between 16 and 256 (so that the minimum number of
  steps costs 16-64 thousand images below 16 384 labelled ones);
- length: at least ``MIN_STEPS`` optimiser steps and at least ``MIN_EPOCHS`` epochs (at most 100);
- learning rate: absolute peak ``PEAK_LR`` (not scaled with the batch), warm-up 10% of the run,
  cosine to 1e-6; layer decay ``LAYER_DECAY``;
- head: initialised as a linear probe of the frozen features (LP-FT), fitted for at least
  ``finetune.probe_steps`` steps, so the first updates do not push the encoder around to train a
  random or half-trained head;
- regularisation: label smoothing 0.1 and drop path 0.1 always; Mixup/CutMix, RandAugment, random
  erasing and ImageNet's crops (area 0.08-1) only from ``STRONG_AUGMENT_FROM`` images on; below, a
  mild random crop of ``SMALL_CROP_SCALE`` of the area and flips (BiT's HyperRule, Kolesnikov et al.
  2020, likewise trains small sets on mild crops). With a few thousand images the strong augmentations
  move the training images so far from the evaluated ones that fine-tuning ends below its own
  starting head.
"""

from __future__ import annotations

import math
from typing import Any

from mixmim.utils.typed import plain

MIN_STEPS = 1000
MIN_EPOCHS = 10
MAX_EPOCHS = 100
PEAK_LR = 1e-3
LAYER_DECAY = 0.75
STRONG_AUGMENT_FROM = 50_000
SMALL_CROP_SCALE = (0.8, 1.0)


def batch_for(images: int) -> int:
    """N / 64 rounded down to a power of two, between 16 and 256 (and at most N)."""
    target = max(16, min(256, images // 64))
    return min(2 ** int(math.log2(target)), max(1, images))


def small_data_settings(images: int, classes: int) -> dict[str, Any]:
    """The config tree of the rule for ``images`` labelled training images of ``classes`` classes."""
    batch = batch_for(images)
    steps_per_epoch = max(1, images // batch)
    epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch)))
    strong = images >= STRONG_AUGMENT_FROM
    return plain({
        "data": {"crop_scale": [0.08, 1.0] if strong else list(SMALL_CROP_SCALE)},
        "train": {"batch_size": batch, "epochs": epochs},
        "optim": {"lr": PEAK_LR, "warmup_epochs": round(0.1 * epochs, 3), "min_lr": 1e-6, "warmup_lr": 0.0,
                  "layer_decay": LAYER_DECAY},
        "model": {"drop_path_rate": 0.1},
        "finetune": {"head_init": "probe", "smoothing": 0.1, "mixup": 0.8 if strong else 0.0,
                     "cutmix": 1.0 if strong else 0.0, "auto_augment": "rand-m9-mstd0.5-inc1" if strong else None,
                     "re_prob": 0.25 if strong else 0.0},
    })


def count_labelled(config: Any) -> tuple[int, int]:
    """(training images, classes) of the run's labelled data, after the limits."""
    from mixmim.transfer.data import load_labelled

    data = load_labelled(config.data, None, None, config.train.seed)
    return len(data.train), len(data.classes)


def describe_rule(images: int, classes: int, rule: dict[str, Any], user: dict[str, Any]) -> str:
    """One line for the log: the rule's values, and which of them the user's keys replaced."""
    flat = _flatten(rule)
    mine = _flatten(user)
    kept = {k: v for k, v in flat.items() if k not in mine}
    text = ", ".join(f"{k}={v}" for k, v in kept.items())
    replaced = sorted(k for k in flat if k in mine)
    return (f"small-data rule for {images} labelled images of {classes} classes: {text}"
            + (f" (you set {', '.join(replaced)})" if replaced else "")
            + "; a paper recipe instead: mixmim finetune --config <recipe> (mixmim recipes --filter finetune/)")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out
