"""The ``data:`` section of every verb's run config: where images come from and how they are augmented
(torch-free, beside the code that reads it: :mod:`mixmim.data.build`, :mod:`mixmim.data.labelled`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mixmim.utils.imagenet import IMAGENET_MEAN, IMAGENET_STD
from mixmim.utils.typed import ConfigError


def _at_least(pairs: list[tuple[str, object, float]]) -> None:
    for key, value, low in pairs:
        if value is not None and value < low:  # type: ignore[operator]
            raise ConfigError(f"config key '{key}': {value} is below the minimum {low}")


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

    def validate(self) -> None:
        """One line naming the first key whose value cannot be used."""
        if not (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
            raise ConfigError(f"config key 'data.crop_scale': {list(self.crop_scale)} must satisfy "
                              "0 < low <= high <= 1")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"config key 'data.max_bad_fraction': {self.max_bad_fraction} must lie in [0, 1]")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"config key 'data.val_fraction': {self.val_fraction} must lie in (0, 1)")
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"config key 'data.crop_pct': {self.crop_pct} must lie in (0, 1]")
        if len(self.mean) != len(self.std) or min(self.std) <= 0:
            raise ConfigError(f"config keys 'data.mean'/'data.std': {list(self.mean)} / {list(self.std)} need one "
                              "value per channel each, positive deviations")
        _at_least([("data.limit_train", self.limit_train, 1), ("data.limit_test", self.limit_test, 1)])
        if self.source in ("folder", "shards", "hf", "stream") and not self.path:
            raise ConfigError(f"config key 'data.path': data.source={self.source} needs the data's path (--data DIR)")
