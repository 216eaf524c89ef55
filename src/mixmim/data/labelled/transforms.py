"""The transforms of the labelled verbs: timm's training augmentation (RandAugment, random erasing,
MixMIM section 8 / Table 12), the evaluation resize and crop, and Mixup/CutMix."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import cast

from PIL import Image
from timm.data import Mixup, create_transform

from mixmim.utils.imagenet import IMAGENET_MEAN, IMAGENET_STD

RAND_AUGMENT = "rand-m9-mstd0.5-inc1"  # RandAug(9, 0.5) of Table 12, as MAE/BEiT write it for timm


def train_transform(img_size: int, auto_augment: str | None = RAND_AUGMENT, re_prob: float = 0.25,
                    scale: tuple[float, float] = (0.08, 1.0), mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD, color_jitter: float | None = None,
                    hflip: bool = True) -> Callable:
    """RandomResizedCrop + flip + RandAugment + random erasing (bicubic), timm's training pipeline.

    ``color_jitter`` is None unless asked for, as in MAE's fine-tuning and the codes built on it
    (``--color_jitter`` defaults to None there) and MAE's linear probe: timm's own default (0.4)
    switches colour jitter on whenever RandAugment is off, which on a small set costs accuracy the
    papers' recipes never paid."""
    # timm takes color_jitter=None (no jitter), which its annotation leaves out.
    transform = create_transform(img_size, is_training=True, auto_augment=auto_augment or None, re_prob=re_prob,
                                 color_jitter=color_jitter, hflip=0.5 if hflip else 0.0,  # type: ignore[arg-type]
                                 scale=cast(tuple[float, float], tuple(scale)), re_mode="pixel", re_count=1,
                                 interpolation="bicubic", mean=tuple(mean), std=tuple(std))
    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):
            if "Posterize" in op.name:
                op.aug_fn = partial(_posterize_at_least_one_bit, op.aug_fn)
    return transform


def _posterize_at_least_one_bit(posterize: Callable, img: Image.Image, bits: int, **kwargs) -> Image.Image:
    # timm's increasing posterize can ask for 0 bits (magnitude noise at the top of the range); Pillow 13
    # rejects that with a ValueError where older versions returned a black image.
    return posterize(img, max(1, int(bits)), **kwargs)


def eval_transform(img_size: int, crop_pct: float = 0.875, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> Callable:
    """Resize to ``img_size / crop_pct`` then centre crop (bicubic)."""
    return create_transform(img_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct,
                            mean=tuple(mean), std=tuple(std))


def make_mixup(num_classes: int, mixup: float = 0.8, cutmix: float = 1.0,
               label_smoothing: float = 0.1) -> Mixup | None:
    """timm's Mixup/CutMix (one of the two per batch, with probability 1) with label smoothing; None
    when both are off."""
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                 label_smoothing=label_smoothing, num_classes=num_classes)
