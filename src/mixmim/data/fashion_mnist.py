"""Fashion-MNIST as Debian ships it (package ``dataset-fashion-mnist``): 28x28 grey clothes, 10 classes.

Used as a small real data set for CPU demos: pretraining (labels ignored), fine-tuning, probing.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_ROOT = Path(os.environ.get("MIXMIM_FASHION_MNIST", DEBIAN_ROOT))


def default_root() -> Path:
    """Where the files are looked for: ``$MIXMIM_FASHION_MNIST`` (read at call time), else Debian's folder."""
    return Path(os.environ.get("MIXMIM_FASHION_MNIST", DEBIAN_ROOT))
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _open(root: Path, name: str):
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return gzip.open(candidate, "rb") if candidate.suffix == ".gz" else open(candidate, "rb")
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}(.gz) not found in {root}; install it with "
        "'sudo apt-get install -y dataset-fashion-mnist' or point MIXMIM_FASHION_MNIST at a folder holding it")


def _read_idx(root: Path, name: str, ndim: int) -> np.ndarray:
    with _open(root, name) as handle:
        raw = handle.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 + ndim:
        raise ValueError(f"{root / name}: not an IDX file of {ndim} dimensions (magic {magic:#x})")
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{root / name}: truncated, expected {shape} values, found {data.size}")
    return data.reshape(shape)


def read_fashion_mnist(split: str = "train", root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of the ``train`` (60k) or ``test`` (10k) split."""
    if split not in _FILES:
        raise ValueError(f"Fashion-MNIST split {split!r}: expected 'train' or 'test'")
    folder = Path(root) if root is not None else default_root()
    images_name, labels_name = _FILES[split]
    images = _read_idx(folder, images_name, 3)
    labels = _read_idx(folder, labels_name, 1).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split} in {folder}: {len(images)} images but {len(labels)} labels")
    return images, labels
