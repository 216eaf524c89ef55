"""Labelled data for the transfer verbs, as the loop wants it: the training split indexed by
``(index, seed)`` with its augmentation a pure function of both (timm's transforms draw from Python's
``random`` and torch, both seeded per sample and restored), the evaluation split by index.

Sources: a folder of class sub-folders (``data.path``; evaluation on ``data.val_path``, else
``path/val`` or ``path/test``, else a seeded per-class ``val_fraction``), or Fashion-MNIST.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from mixmim.config import ConfigError, DataConfig
from mixmim.data.labelled import FASHION_MNIST, LabelledImages, Splits, load_splits


class SeededLabelled(Dataset):
    """``dataset[(index, seed)]`` -> ``{"image", "label", "index", "skipped"}``; the transform runs
    under a private seed of every generator timm's transforms draw from (torch, Python's ``random``,
    NumPy's global one: RandAugment picks its ops with ``np.random.choice``), so the same (index, seed)
    gives the same crop in any process."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.classes = list(dataset.classes)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def targets(self) -> list[int]:
        return list(self.dataset.targets)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, key)
        state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                skipped_before = set(getattr(self.dataset, "skipped", ()))
                image, label = self.dataset[index]
        finally:
            random.setstate(state)
            np.random.set_state(np_state)
        skipped = [(p, "unreadable image") for p in set(getattr(self.dataset, "skipped", ())) - skipped_before]
        return {"image": image, "label": int(label), "index": index, "skipped": skipped}


@dataclass
class LabelledData:
    train: SeededLabelled
    test: Dataset
    classes: list[str]


def load_labelled(data: DataConfig, train_tf: Callable | None, eval_tf: Callable | None, seed: int) -> LabelledData:
    """The splits ``data`` names, with the transforms; one-line errors for what cannot be used."""
    if data.source not in ("folder", FASHION_MNIST):
        raise ConfigError(f"config key 'data.source': {data.source!r} has no labels; the transfer verbs read a "
                          "folder of class sub-folders or fashion_mnist")
    spec = FASHION_MNIST if data.source == FASHION_MNIST else data.path
    if data.val_path:
        splits = _with_val_folder(Path(data.path), Path(data.val_path), train_tf, eval_tf, data, seed)
    else:
        splits = load_splits(spec, train_tf, eval_tf, data.limit_train, data.limit_test, data.val_fraction, seed,
                             data.balanced)
    if len(splits.classes) < 2:
        raise ConfigError(f"data {spec}: {len(splits.classes)} class ({', '.join(splits.classes)}); classification "
                          "needs at least two class sub-folders")
    return LabelledData(SeededLabelled(splits.train), splits.test, list(splits.classes))


def _with_val_folder(train: Path, val: Path, train_tf, eval_tf, data: DataConfig, seed: int) -> Splits:
    from mixmim.data.labelled import _class_samples, _subset, balanced_subset

    for folder in (train, val):
        if not folder.is_dir():
            raise FileNotFoundError(f"data folder {folder} does not exist")
    train_samples, classes = _class_samples(train)
    val_samples, val_classes = _class_samples(val)
    if val_classes != classes:
        raise ValueError(f"the evaluation folder {val} has classes {val_classes}, the training folder {train} has "
                         f"{classes}: they must be the same class sub-folders")

    def pick(samples, limit, s):
        labels = [y for _, y in samples]
        if data.balanced and limit is not None and limit < len(labels):
            return [samples[i] for i in balanced_subset(labels, limit, s)]
        return [samples[i] for i in _subset(len(labels), limit, s)]

    return Splits(LabelledImages(pick(train_samples, data.limit_train, seed), classes, train_tf),
                  LabelledImages(pick(val_samples, data.limit_test, seed + 1), classes, eval_tf), classes)


def collate_labelled(items: list[dict]) -> dict:
    """Stack a micro-batch of labelled items (images and labels; the skipped files of the batch)."""
    return {"image": torch.stack([it["image"] for it in items]),
            "label": torch.as_tensor([it["label"] for it in items]) if not torch.is_tensor(items[0]["label"])
            else torch.stack([it["label"] for it in items]),
            "index": torch.tensor([it["index"] for it in items]),
            "skipped": [s for it in items for s in it["skipped"]]}
