"""Pretraining data sets: an image folder, Fashion-MNIST, or photos bundled with scikit-image.

Every data set is indexed by ``(index, seed)`` pairs from :class:`~mixmim.data.sampler.ResumableSampler`:
the seed drives the sample's augmentation, so a sample looks the same whichever worker, rank or
restart loads it, which is what makes ``--resume`` and multi-GPU runs replay exactly.
Items are dicts ``{"image": Tensor, "index": int, "skipped": [(path, reason), ...]}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mixmim.data.images import BadImage, load_rgb
from mixmim.data.scan import scan_images

# Natural photographs shipped inside the scikit-image wheel (no download, no install step).
BUNDLED_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
                  "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
                  "microaneurysms.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png", "retina.jpg",
                  "rocket.jpg", "color.png")


def _augment(transform: Callable, image, seed: int) -> torch.Tensor:
    # Private RNG per sample: the same (index, seed) gives the same crop in any process.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


class SeededDataset(Dataset):
    transform: Callable

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def __getitem__(self, key: tuple[int, int] | int) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, key)
        return {"image": _augment(self.transform, self.load(index), seed), "index": index, "skipped": []}


class ImageFolderDataset(SeededDataset):
    """Every image under a folder, recursively; labels (sub-folder names) ignored. An unreadable file
    is replaced by the next readable one and reported in the item's ``skipped`` list."""

    def __init__(self, root: str | Path, transform: Callable, max_tries: int = 32):
        scan = scan_images(root)
        self.root = Path(root)
        self.files = scan.files
        self.scan_problems = scan.problems
        self.transform = transform
        self.max_tries = max_tries

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int] | int) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, key)
        skipped = []
        for attempt in range(self.max_tries):
            # Substitutes are chosen deterministically so a resumed run sees the same batch.
            candidate = (index + attempt) % len(self.files)
            path = self.files[candidate]
            try:
                image = load_rgb(path)
            except BadImage as exc:
                skipped.append((str(path), str(exc)))
                continue
            return {"image": _augment(self.transform, image, seed), "index": candidate, "skipped": skipped}
        raise RuntimeError(f"{self.max_tries} consecutive unreadable images in {self.root} from "
                           f"{self.files[index]}; the folder looks broken (see the skipped list)")


class FashionMNISTImages(SeededDataset):
    """Fashion-MNIST images (grey 28x28, turned RGB and resized by the transform); labels ignored."""

    def __init__(self, transform: Callable, split: str = "train", root: str | Path | None = None):
        from mixmim.data.fashion_mnist import read_fashion_mnist

        self.images, self.labels = read_fashion_mnist(split, root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index], mode="L").convert("RGB")


def bundled_photo_paths() -> list[Path]:
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    paths = [folder / name for name in BUNDLED_PHOTOS if (folder / name).is_file()]
    if not paths:
        raise FileNotFoundError(f"no bundled photos found in {folder}; is scikit-image installed?")
    return paths


class BundledPhotos(SeededDataset):
    """The default data: random resized crops of scikit-image's sample photos. An epoch is
    ``epoch_size`` crops (the photos cycle), since there are only ~20 of them."""

    def __init__(self, transform: Callable, epoch_size: int = 512):
        self.paths = bundled_photo_paths()
        self.photos = [load_rgb(p) for p in self.paths]
        self.transform = transform
        self.epoch_size = epoch_size

    def __len__(self) -> int:
        return self.epoch_size

    def load(self, index: int) -> Image.Image:
        return self.photos[index % len(self.photos)]


def collate(items: list[dict]) -> dict:
    """Stack images; gather the skipped files of the whole batch."""
    return {"image": torch.stack([it["image"] for it in items]),
            "index": torch.tensor([it["index"] for it in items]),
            "skipped": [s for it in items for s in it["skipped"]]}


def array_to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
