"""Labelled data for fine-tuning, probing, k-NN and the pretraining monitor: an image folder with one
sub-folder per class, WebDataset shards with ``.cls`` members (or ImageNet's tar of per-class tars),
a local Hugging Face dataset, or Fashion-MNIST; timm's transforms and Mixup/CutMix (MixMIM section 8,
Table 12).

Layouts: ``DATA/<class>/*.jpg`` (a fraction held out per class for evaluation, seeded), or
``DATA/train/<class>/...`` with ``DATA/val/<class>/...`` (or ``test``); shards alike (one shard set, or
``train/`` and ``val/`` shard sets); a Hugging Face dataset's own splits, else a held-out fraction.

Items are seeded like pretraining's: ``ds[(index, seed)]`` is ``{"image", "label", "index", "skipped"}``
with the augmentation a pure function of (index, seed) -- timm's transforms draw from Python's
``random``, NumPy's and torch's global generators, so all three are seeded per sample and restored.
``ds[index]`` (a plain int, what torchvision-style loaders pass) is the pair ``(image, label)`` with
seed = index. An unreadable image is replaced by the next readable one, listed in the item's
``skipped`` and in ``ds.skipped`` (warned once per file).
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

from mixmim.data.images import IMAGE_EXTENSIONS, BadImage, mode_of
from mixmim.data.seeding import augment
from mixmim.data.sources import ArraySource, ImageSource, SubsetSource
from mixmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("mixmim")

FASHION_MNIST = "fashion_mnist"
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
    transform = create_transform(img_size, is_training=True, auto_augment=auto_augment or None, re_prob=re_prob,
                                 color_jitter=color_jitter, hflip=0.5 if hflip else 0.0,
                                 scale=tuple(scale), re_mode="pixel", re_count=1, interpolation="bicubic",
                                 mean=tuple(mean), std=tuple(std))
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
        return self.source.labels.tolist()

    def item(self, index: int, seed: int, transform: Callable | None = ...) -> dict:
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


def _held_out(source: ImageSource, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded ``val_fraction`` of the images for evaluation (at least one when the class has two)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in range(len(source.classes)):
        mine = np.flatnonzero(source.labels == label)
        order = rng.permutation(len(mine))
        n_test = max(1, round(len(mine) * val_fraction)) if len(mine) > 1 else 0
        test += mine[order[:n_test]].tolist()
        train += mine[order[n_test:]].tolist()
    # The order of the source (class by class, as the folder lists them), as the previous code kept it.
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(test), dtype=np.int64)


def check_classes(source: ImageSource, mode: str, where: str) -> None:
    """A one-line ValueError for a class that has no image, or none that decodes (tries each in turn:
    usually one decode per class)."""
    for label, name in enumerate(source.classes):
        members = np.flatnonzero(source.labels == label)
        if len(members) == 0:
            raise ValueError(f"class folder {Path(where) / name} holds no images")
        reasons = []
        for i in members:
            try:
                source.load(int(i), mode)
                break
            except BadImage as exc:
                reasons.append(str(exc))
        else:
            raise ValueError(f"class {name!r} of {where} has no readable image ({len(members)} file(s), first "
                             f"problem: {reasons[0]})")


def labelled_sources(data: str | Path, val_fraction: float = 0.2, seed: int = 0, hf_image_column: str = "image",
                     hf_label_column: str = "label", val_data: str | Path | None = None) -> tuple[ImageSource, ImageSource]:
    """(train, test) sources of a labelled folder, shard set(s), Hugging Face dataset or ``fashion_mnist``;
    with ``val_data``, all of ``data`` trains and all of ``val_data`` (of any of those kinds) evaluates."""
    if val_data is not None:
        train, test = (_whole(p, hf_image_column, hf_label_column) for p in (data, val_data))
        for part in (train, test):
            if part.classes is None:
                raise ValueError(f"{part.describe()} has no labels (no .cls members, label column or class folders)")
        if test.classes != train.classes:
            raise ValueError(f"the evaluation data {val_data} has classes {test.classes}, the training data {data} has "
                             f"{train.classes}: they must be the same classes")
        return train, test
    from mixmim.data.fashion_mnist import CLASSES, read_fashion_mnist
    from mixmim.data.hf import HFSource, is_hf_dataset, load_hf_splits
    from mixmim.data.shards import ShardSource, shard_files, shard_splits

    if str(data) == FASHION_MNIST:
        (xtr, ytr), (xte, yte) = read_fashion_mnist("train"), read_fashion_mnist("test")
        return (ArraySource(xtr, ytr, CLASSES, "fashion_mnist train"), ArraySource(xte, yte, CLASSES,
                                                                                  "fashion_mnist test"))
    root = Path(data).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist (or pass 'fashion_mnist')")
    if root.is_file() and root.suffix.lower() in IMAGE_EXTENSIONS:
        raise ValueError(f"--data {root} is an image file, expected a folder with one sub-folder per class")
    # Split layouts (train + held-out parts of one set) are found here; what kind a path holds is
    # open_source's to tell.
    pair: tuple[ImageSource, ImageSource] | None = None
    held = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if shard_splits(root):
        train_shards, held_shards = shard_splits(root)
        pair = ShardSource(train_shards), ShardSource(held_shards)
    elif is_hf_dataset(root) and {"train", "test"} <= set(splits := load_hf_splits(root)):
        pair = (HFSource(splits["train"], hf_image_column, hf_label_column, f"{root}:train"),
                HFSource(splits["test"], hf_image_column, hf_label_column, f"{root}:test"))
    elif (root / "train").is_dir() and held is not None and not shard_files(root):
        pair = _whole(root / "train", hf_image_column, hf_label_column), _whole(held, hf_image_column, hf_label_column)
    if pair is not None:
        train, test = pair
        for part in pair:
            if part.classes is None:
                raise ValueError(f"{part.describe()} has no labels (no .cls members, label column or class folders)")
        if test.classes != train.classes:
            raise ValueError(f"{test.describe()} has classes {test.classes}, {train.describe()} has {train.classes}")
        return train, test
    whole = _whole(root, hf_image_column, hf_label_column)
    if whole.classes is None:
        raise ValueError(f"{whole.describe()} has no labels (no .cls members, label column or class folders)")
    train_idx, test_idx = _held_out(whole, val_fraction, seed)
    return SubsetSource(whole, train_idx), SubsetSource(whole, test_idx)


def _whole(data: str | Path, hf_image_column: str, hf_label_column: str) -> ImageSource:
    """Every labelled image at ``data`` (shards, a Hugging Face dataset's training split, a class folder)."""
    from mixmim.data import open_source

    root = Path(data).expanduser()
    if root.is_file() and root.suffix.lower() in IMAGE_EXTENSIONS:
        raise ValueError(f"--data {root} is an image file, expected a folder with one sub-folder per class")
    return open_source(root, "auto", hf_image_column, hf_label_column, labelled=True)


def load_splits(data: str | Path, train_tf: Callable | None, test_tf: Callable | None,
                limit_train: int | None = None, limit_test: int | None = None, val_fraction: float = 0.2,
                seed: int = 0, balanced: bool = False, channels: int = 3, hf_image_column: str = "image",
                hf_label_column: str = "label", val_data: str | Path | None = None) -> Splits:
    """Train and evaluation sets of ``data`` (see :func:`labelled_sources`), with optional seeded subsets
    of ``limit_*`` samples for quick runs (``balanced``: the same count per class)."""

    def pick(source: ImageSource, limit, s) -> ImageSource:
        labels = source.labels
        if balanced and limit is not None and limit < len(labels):
            return SubsetSource(source, balanced_subset(labels, limit, s))
        if limit is not None and limit < len(labels):
            return SubsetSource(source, _subset(len(labels), limit, s))
        return source

    mode = mode_of(channels)
    train, test = labelled_sources(data, val_fraction, seed, hf_image_column, hf_label_column, val_data)
    if str(data) != FASHION_MNIST:
        check_classes(train, mode, str(data))
    train, test = pick(train, limit_train, seed), pick(test, limit_test, seed + 1)
    return Splits(LabelledDataset(train, train_tf, channels), LabelledDataset(test, test_tf, channels),
                  list(train.classes))


# ---------------------------------------------------------------------------------------------- loading
def collate_labelled(items: list[dict]) -> dict:
    """Dict items -> ``{"image": (B, C, H, W), "label", "index": (B,), "skipped": [...]}``: integer labels as
    a (B,) long tensor, tensor labels (soft targets, segmentation masks) stacked."""
    labels = [it["label"] for it in items]
    return {"image": torch.stack([it["image"] for it in items]),
            "label": torch.stack(labels) if torch.is_tensor(labels[0]) else torch.tensor(labels, dtype=torch.long),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
            "skipped": [s for it in items for s in it["skipped"]]}


def make_mixup(num_classes: int, mixup: float = 0.8, cutmix: float = 1.0,
               label_smoothing: float = 0.1) -> Mixup | None:
    """timm's Mixup/CutMix (one of the two per batch, with probability 1) with label smoothing; None
    when both are off."""
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                 label_smoothing=label_smoothing, num_classes=num_classes)


# ---------------------------------------------------------------------------------------------- caching
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
        return image.float().div(255).sub_(self.mean).div_(self.std)  # ToTensor's then Normalize's arithmetic

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
    DataLoader workers) and keep the tensors (:class:`CachedLabelled`); unreadable files are left out. The transform must be deterministic (an
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
