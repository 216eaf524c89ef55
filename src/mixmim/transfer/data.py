"""Labelled data for the transfer verbs, as the loop wants it: the training split indexed by
``(index, seed)`` with its augmentation a pure function of both, the evaluation split by index
(:mod:`mixmim.data.labelled` does the seeding, the sources and the one-line errors).

Sources: a folder of class sub-folders, WebDataset shards with labels or a Hugging Face dataset
(``data.path``; evaluation on ``data.val_path``, else ``path/val`` or ``path/test``, else a seeded
per-class ``val_fraction``), or Fashion-MNIST; ``data.channels`` 1 or 3.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from mixmim.config import ConfigError, DataConfig
from mixmim.data import normalization
from mixmim.data.labelled import FASHION_MNIST, LabelledDataset, collate_labelled, load_splits

if TYPE_CHECKING:
    from mixmim.evaluation.sharded import SizedDataset

__all__ = ["LABELLED_SOURCES", "LabelledData", "collate_labelled", "data_stats", "load_labelled"]

LABELLED_SOURCES = ("folder", "shards", "hf", FASHION_MNIST)


@dataclass
class LabelledData:
    train: LabelledDataset
    test: SizedDataset  # the evaluation split (linear probing on cached features: their FeatureSet)
    classes: list[str]


def data_stats(data: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the transfer transforms normalise with: ``data.mean``/``data.std`` (use the
    pretraining run's), else ImageNet's for ``data.channels`` (``data.normalize=none``: [0, 1] pixels)."""
    if data.normalize == "dataset" and (data.mean, data.std) == (DataConfig.mean, DataConfig.std):
        raise ConfigError("config key 'data.normalize': 'dataset' is measured for pretraining only; the transfer "
                          "verbs take the pretraining run's statistics as data.mean=[...] data.std=[...] "
                          "(mixmim stats --data DIR prints them)")
    return normalization(data, data.channels)


def load_labelled(data: DataConfig, train_tf: Callable | None, eval_tf: Callable | None, seed: int) -> LabelledData:
    """The splits ``data`` names, with the transforms; one-line errors for what cannot be used."""
    if data.source not in LABELLED_SOURCES:
        raise ConfigError(f"config key 'data.source': {data.source!r} has no labels; the transfer verbs read "
                          f"{', '.join(LABELLED_SOURCES)}")
    if data.source != FASHION_MNIST and not data.path:
        raise ConfigError(f"config key 'data.path': data.source={data.source} needs a path (--data DIR)")
    spec = FASHION_MNIST if data.source == FASHION_MNIST else cast(str, data.path)  # checked above
    splits = load_splits(spec, train_tf, eval_tf, data.limit_train, data.limit_test, data.val_fraction, seed,
                         data.balanced, data.channels, data.hf_image_column, data.hf_label_column, data.val_path)
    if len(splits.classes) < 2:
        raise ConfigError(f"data {spec}: {len(splits.classes)} class ({', '.join(splits.classes)}); classification "
                          "needs at least two classes")
    return LabelledData(splits.train, splits.test, list(splits.classes))


def seeded_subset(size: int, limit: int | None, seed: int) -> list[int]:
    """A seeded subset of ``limit`` of ``size`` indices, in order (all of them without a limit):
    ``data.limit_train`` / ``data.limit_test`` of the dense tasks."""
    if limit is None or limit >= size:
        return list(range(size))
    import random

    return sorted(random.Random(seed).sample(range(size), limit))
