"""Which images train and which evaluate: the split layouts of a folder, a shard set or a Hugging Face
dataset (``train/`` + ``val/`` or ``test/``, or a seeded per-class held-out fraction), Fashion-MNIST,
and the seeded (class-balanced) subsets of quick runs and semi-supervised evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from mixmim.data.images import IMAGE_EXTENSIONS, BadImage, mode_of
from mixmim.data.labelled.datasets import LabelledDataset
from mixmim.data.sources import ArraySource, ImageSource, SubsetSource

FASHION_MNIST = "fashion_mnist"


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
    train: LabelledDataset
    test: LabelledDataset
    classes: list[str]


def _held_out(source: ImageSource, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded ``val_fraction`` of the images for evaluation (at least one when the class has two)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in range(len(cast(list[str], source.classes))):  # labelled: the caller checked
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
    for label, name in enumerate(cast(list[str], source.classes)):  # a labelled source
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
                     hf_label_column: str = "label", val_data: str | Path | None = None) -> tuple[ImageSource,
                                                                                                  ImageSource]:
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
    if found := shard_splits(root):
        train_shards, held_shards = found
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
        labels = cast(np.ndarray, source.labels)  # a labelled source
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
                  list(cast(list[str], train.classes)))
