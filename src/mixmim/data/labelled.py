"""Labelled data for fine-tuning, probing and k-NN: an image folder with one sub-folder per class, or
Fashion-MNIST; timm's transforms and Mixup/CutMix (MixMIM section 8, Table 12).

Folder layout: ``DATA/<class>/*.jpg`` (a fraction held out per class for evaluation, seeded), or
``DATA/train/<class>/...`` with ``DATA/val/<class>/...`` (or ``test``). Unreadable files are replaced
by the next readable one and counted (never a crash hours into a run).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup, create_transform
from torch.utils.data import DataLoader, Dataset

from mixmim.data.images import BadImage, load_rgb
from mixmim.data.scan import scan_images
from mixmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("mixmim")

FASHION_MNIST = "fashion_mnist"
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"  # RandAug(9, 0.5) of Table 12, as MAE/BEiT write it for timm


def train_transform(img_size: int, auto_augment: str | None = RAND_AUGMENT, re_prob: float = 0.25,
                    scale: tuple[float, float] = (0.08, 1.0)) -> Callable:
    """RandomResizedCrop + flip + RandAugment + random erasing (bicubic), timm's training pipeline."""
    transform = create_transform(img_size, is_training=True, auto_augment=auto_augment or None, re_prob=re_prob,
                                 scale=tuple(scale), re_mode="pixel", re_count=1, interpolation="bicubic",
                                 mean=IMAGENET_MEAN,
                                 std=IMAGENET_STD)
    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):
            if "Posterize" in op.name:
                op.aug_fn = partial(_posterize_at_least_one_bit, op.aug_fn)
    return transform


def _posterize_at_least_one_bit(posterize: Callable, img: Image.Image, bits: int, **kwargs) -> Image.Image:
    # timm's increasing posterize can ask for 0 bits (magnitude noise at the top of the range); Pillow 13
    # rejects that with a ValueError where older versions returned a black image.
    return posterize(img, max(1, int(bits)), **kwargs)


def eval_transform(img_size: int, crop_pct: float = 0.875) -> Callable:
    """Resize to ``img_size / crop_pct`` then centre crop (bicubic)."""
    return create_transform(img_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


class LabelledImages(Dataset):
    """(path, label) pairs read as RGB; an unreadable file is replaced by the next readable one."""

    def __init__(self, samples: Sequence[tuple[Path, int]], classes: Sequence[str], transform: Callable | None,
                 max_tries: int = 32):
        if not samples:
            raise ValueError("no labelled images to load")
        self.samples, self.classes = list(samples), list(classes)
        self.transform = transform
        self.max_tries = max_tries
        self.skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __getitem__(self, index: int):
        for attempt in range(self.max_tries):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                image = load_rgb(path)
            except BadImage as exc:
                if str(path) not in self.skipped:
                    self.skipped.add(str(path))
                    log.warning("skipping unreadable image %s: %s", path, exc)
                continue
            return (self.transform(image) if self.transform else image), label
        raise ValueError(f"{self.max_tries} consecutive unreadable images from {self.samples[index][0]}")


class FashionMNISTLabelled(Dataset):
    """Fashion-MNIST: grey 28x28 turned RGB (the transform resizes to the model's input)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None):
        from mixmim.data.fashion_mnist import CLASSES

        self.images, self.labels = images, labels
        self.classes = list(CLASSES)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index], mode="L").convert("RGB")
        return (self.transform(image) if self.transform else image), int(self.labels[index])


def _class_samples(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root} has no class sub-folders")
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for path in scan_images(root).files:
        top = path.relative_to(root).parts[0]
        if top in index and len(path.relative_to(root).parts) > 1:
            samples.append((path, index[top]))
    return samples, classes


def _subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:limit]) if limit is not None and limit < n else np.arange(n)


def balanced_subset(labels: Sequence[int] | np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``size`` samples drawn at random with (as far as the classes allow) the same
    number per class: the seeded, class-balanced label subsets of semi-supervised evaluation
    (e.g. 1% and 10% of the labels)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    pools = {c: rng.permutation(np.flatnonzero(labels == c)).tolist() for c in classes}
    picked: list[int] = []
    while len(picked) < min(size, len(labels)):
        for c in rng.permutation(classes):  # one per class per round; the last round in random order
            if pools[c] and len(picked) < size:
                picked.append(pools[c].pop())
    return np.sort(np.array(picked, dtype=np.int64))


@dataclass
class Splits:
    train: Dataset
    test: Dataset
    classes: list[str]


def load_splits(data: str | Path, train_tf: Callable | None, test_tf: Callable | None,
                limit_train: int | None = None, limit_test: int | None = None, val_fraction: float = 0.2,
                seed: int = 0, balanced: bool = False) -> Splits:
    """Train and evaluation sets of ``data`` (``"fashion_mnist"`` or a folder), with optional seeded
    subsets of ``limit_*`` samples for quick runs (``balanced``: the same count per class)."""

    def pick(labels, limit, s):
        if balanced and limit is not None and limit < len(labels):
            return balanced_subset(labels, limit, s)
        return _subset(len(labels), limit, s)

    if str(data) == FASHION_MNIST:
        from mixmim.data.fashion_mnist import read_fashion_mnist

        (xtr, ytr), (xte, yte) = read_fashion_mnist("train"), read_fashion_mnist("test")
        tr, te = pick(ytr, limit_train, seed), pick(yte, limit_test, seed + 1)
        train = FashionMNISTLabelled(xtr[tr], ytr[tr], train_tf)
        return Splits(train, FashionMNISTLabelled(xte[te], yte[te], test_tf), train.classes)
    root = Path(data).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist (or pass 'fashion_mnist')")
    held_out = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and held_out is not None:
        train_samples, classes = _class_samples(root / "train")
        test_samples, test_classes = _class_samples(held_out)
        if test_classes != classes:
            raise ValueError(f"{held_out} has classes {test_classes}, {root / 'train'} has {classes}")
    else:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
        samples, classes = _class_samples(root)
        rng = np.random.default_rng(seed)
        train_samples, test_samples = [], []
        for label in range(len(classes)):
            mine = [s for s in samples if s[1] == label]
            order = rng.permutation(len(mine))
            n_test = max(1, round(len(mine) * val_fraction)) if len(mine) > 1 else 0
            test_samples += [mine[i] for i in order[:n_test]]
            train_samples += [mine[i] for i in order[n_test:]]
    train_samples = [train_samples[i] for i in pick([y for _, y in train_samples], limit_train, seed)]
    test_samples = [test_samples[i] for i in pick([y for _, y in test_samples], limit_test, seed + 1)]
    return Splits(LabelledImages(train_samples, classes, train_tf), LabelledImages(test_samples, classes, test_tf),
                  classes)


def make_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int = 0, seed: int = 0) -> DataLoader:
    """Shuffled, last partial batch dropped (Mixup pairs within a batch) for training; in order for eval."""
    if train:
        batch_size = min(batch_size, len(dataset))
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train, num_workers=num_workers,
                      generator=generator, persistent_workers=False, pin_memory=torch.cuda.is_available())


def make_mixup(num_classes: int, mixup: float = 0.8, cutmix: float = 1.0,
               label_smoothing: float = 0.1) -> Mixup | None:
    """timm's Mixup/CutMix (one of the two per batch, with probability 1) with label smoothing; None
    when both are off."""
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                 label_smoothing=label_smoothing, num_classes=num_classes)
