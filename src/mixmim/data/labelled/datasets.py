"""Labelled items, seeded like pretraining's: ``ds[(index, seed)]`` is ``{"image", "label", "index",
"skipped"}`` with the augmentation a pure function of (index, seed); an unreadable image is replaced
by the next readable one and listed. One collate for every labelled batch."""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import EllipsisType
from typing import cast

import numpy as np
import torch
from torch.utils.data import Dataset

from mixmim.data.images import BadImage, mode_of
from mixmim.data.seeding import augment
from mixmim.data.sources import ImageSource

log = logging.getLogger("mixmim")


class LabelledDataset(Dataset):
    """The labelled images of a source, seeded per sample (see the module docstring)."""

    def __init__(self, source: ImageSource, transform: Callable | None, channels: int = 3, max_tries: int = 32):
        if len(source) == 0:
            raise ValueError(f"no labelled images to load in {source.describe()}")
        if source.labels is None or source.classes is None:
            raise ValueError(f"{source.describe()} has no labels")
        self.source, self.transform = source, transform
        self.classes = list(source.classes)
        self.channels, self.mode = channels, mode_of(channels)
        self.max_tries = max_tries
        self.skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.source)

    @property
    def targets(self) -> list[int]:
        return cast(np.ndarray, self.source.labels).tolist()  # __init__ checked it is not None

    def item(self, index: int, seed: int, transform: Callable | EllipsisType | None = ...) -> dict:
        """``{"image", "label", "index", "skipped"}`` of sample ``index`` under augmentation seed ``seed``
        (with ``transform`` instead of the data set's when given)."""
        transform = self.transform if transform is ... else transform
        skipped = []
        for attempt in range(self.max_tries):
            candidate = (index + attempt) % len(self.source)
            try:
                image = self.source.load(candidate, self.mode)
            except BadImage as exc:
                name = self.source.name(candidate)
                skipped.append((name, str(exc)))
                if name not in self.skipped:
                    self.skipped.add(name)
                    log.warning("skipping unreadable image %s: %s", name, exc)
                continue
            if transform is not None:
                image = augment(transform, image, seed)
            return {"image": image, "label": self.source.label(candidate), "index": candidate, "skipped": skipped}
        raise ValueError(f"{self.max_tries} consecutive unreadable images in {self.source.describe()} from "
                         f"{self.source.name(index)}")

    def __getitem__(self, key: tuple[int, int] | int):
        if isinstance(key, tuple):
            return self.item(int(key[0]), int(key[1]))
        out = self.item(int(key), int(key))
        return out["image"], out["label"]


def collate_labelled(items: list[dict]) -> dict:
    """Dict items -> ``{"image": (B, C, H, W), "label", "index": (B,), "skipped": [...]}``: integer labels as
    a (B,) long tensor, tensor labels (soft targets, segmentation masks) stacked."""
    labels = [it["label"] for it in items]
    return {"image": torch.stack([it["image"] for it in items]),
            "label": torch.stack(labels) if torch.is_tensor(labels[0]) else torch.tensor(labels, dtype=torch.long),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
            "skipped": [s for it in items for s in it["skipped"]]}
