"""A labelled set decoded and transformed once and kept (uint8, bit-identical items): what the monitor and
the cached linear probe read every evaluation."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch.utils.data import DataLoader, Dataset

from mixmim.data.labelled.datasets import LabelledDataset


class CachedLabelled(Dataset):
    """A labelled data set decoded and transformed once, its tensors kept: for evaluation sets read many
    times with a deterministic transform (the monitor's k-NN bank and test set, every N steps).

    Items as :class:`LabelledDataset`'s, for any seed (the transform was applied with seed = index).
    When the transform ends in ToTensor + Normalize (timm's evaluation transform does), the pixels are
    kept as uint8 (4x less memory) and normalised on access with the same operations, so the items are
    bit-identical to the uncached ones.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str], skipped: list,
                 mean: torch.Tensor | None, std: torch.Tensor | None):
        self.images, self.labels, self.classes = images, labels, classes
        self.skipped = skipped
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def tensor(self, index: int) -> torch.Tensor:
        image = self.images[index]
        if self.mean is None:
            return image
        std = cast(torch.Tensor, self.std)  # None only together with mean
        return image.float().div(255).sub_(self.mean).div_(std)  # ToTensor's then Normalize's arithmetic

    def __getitem__(self, key: tuple[int, int] | int):
        index = int(key[0] if isinstance(key, tuple) else key)
        if isinstance(key, tuple):
            return {"image": self.tensor(index), "label": int(self.labels[index]), "index": index, "skipped": []}
        return self.tensor(index), int(self.labels[index])


def _split_normalize(transform: Callable) -> tuple[Callable, torch.Tensor, torch.Tensor] | None:
    """(the transform without its final Normalize, mean, std) when it ends in ToTensor + Normalize."""
    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or type(steps[-1]).__name__ != "Normalize" or "ToTensor" not in type(steps[-2]).__name__:
        return None
    from torchvision.transforms import Compose

    last = steps[-1]
    return (Compose(steps[:-1]), torch.as_tensor(last.mean, dtype=torch.float32).view(-1, 1, 1),
            torch.as_tensor(last.std, dtype=torch.float32).view(-1, 1, 1))


class _Decoded(Dataset):
    """What the cache is filled from: (image tensor, label, skipped) of each item of ``dataset``."""

    def __init__(self, dataset: LabelledDataset, transform: Callable | None, as_uint8: bool):
        self.dataset, self.transform, self.as_uint8 = dataset, transform, as_uint8

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset.item(index, index, self.transform)
        image = item["image"]
        if self.as_uint8:
            image = image.mul(255).round_().to(torch.uint8)  # exact: ToTensor made k / 255
        return image, item["label"], item["skipped"], item["index"] == index  # False: a stand-in


def _as_list(items: list) -> list:
    return items


def cached(dataset: LabelledDataset, num_workers: int = 0, batch_size: int = 64) -> CachedLabelled:
    """Decode and transform every readable item of ``dataset`` once (seed = index; on ``num_workers``
    DataLoader workers) and keep the tensors (:class:`CachedLabelled`); unreadable files are left out.
    The transform must be deterministic (an
    evaluation transform): the cache serves the same tensor whatever seed is asked for."""
    split = _split_normalize(dataset.transform) if dataset.transform is not None else None
    transform, mean, std = split if split is not None else (dataset.transform, None, None)
    source = _Decoded(dataset, transform, split is not None)
    loader = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_as_list)
    images, labels, skipped = [], [], []
    for batch in loader:
        for image, label, bad, own in batch:
            skipped += bad
            if not own:  # an unreadable file's stand-in (its neighbour): not kept twice
                continue
            images.append(image)
            labels.append(label)
    return CachedLabelled(torch.stack(images), torch.tensor(labels, dtype=torch.long), list(dataset.classes),
                          skipped, mean, std)
