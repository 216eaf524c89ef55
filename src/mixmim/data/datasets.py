"""Pretraining data sets: any image source (folder, shards, Hugging Face), Fashion-MNIST, or photos bundled
with scikit-image.

Every data set is indexed by ``(index, seed)`` pairs from :class:`~mixmim.data.sampler.ResumableSampler`:
the seed drives the sample's augmentation, so a sample looks the same whichever worker, rank or
restart loads it, which is what makes ``--resume`` and multi-GPU runs replay exactly.
Items are dicts ``{"image": Tensor(C, H, W), "index": int, "skipped": [(name, reason), ...]}``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from mixmim.data.images import BadImage, DataQualityError, decode, mode_of
from mixmim.data.seeding import augment
from mixmim.data.sources import FolderSource, ImageSource

# Natural photographs shipped inside the scikit-image wheel (no download, no install step).
BUNDLED_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
                  "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
                  "microaneurysms.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png", "retina.jpg",
                  "rocket.jpg", "color.png")


def _key(key: tuple[int, int] | int) -> tuple[int, int]:
    index, seed = key if isinstance(key, tuple) else (key, key)
    return int(index), int(seed)


class SeededDataset(Dataset):
    """``ds[(index, seed)]`` -> ``{"image", "index", "skipped"}``; ``ds[index]`` uses seed = index."""

    transform: Callable | None  # None: a raw data set, read only for its statistics
    channels: int = 3
    mean: tuple[float, ...] | None  # the normalisation of the transform: build_pretrain_dataset sets both
    std: tuple[float, ...] | None

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def __getitem__(self, key: tuple[int, int] | int) -> dict:
        index, seed = _key(key)
        return {"image": augment(self.transform, self.load(index), seed), "index": index, "skipped": []}

    @staticmethod
    def collate_fn(items: list[dict]) -> dict:
        """The DataLoader's ``collate_fn`` for this data set's items."""
        return collate(items)

    def finish_batch(self, batch: dict, device=None) -> dict:
        """What the loop calls on each collated batch before using ``batch["image"]`` (GPU decoding
        happens here with ``data.decode=gpu``; nothing to do otherwise)."""
        return batch


class SourceDataset(SeededDataset):
    """Every image of an :class:`~mixmim.data.sources.ImageSource`; labels ignored. An unreadable image is
    replaced by the next readable one and reported in the item's ``skipped`` list."""

    def __init__(self, source: ImageSource, transform: Callable, channels: int = 3, max_tries: int = 32):
        self.source = source
        self.scan_problems = source.scan_problems
        self.transform = transform
        self.channels, self.mode = channels, mode_of(channels)
        self.max_tries = max_tries

    def __len__(self) -> int:
        return len(self.source)

    def open(self, index: int) -> Image.Image:
        """The image as the transform takes it: only opened (header) for ours, which decodes what the crop needs."""
        if getattr(self.transform, "takes_seed", False):
            return self.source.open(index)
        return self.source.load(index, self.mode)

    def __getitem__(self, key: tuple[int, int] | int) -> dict:
        index, seed = _key(key)
        skipped = []
        for attempt in range(self.max_tries):
            # Substitutes are chosen deterministically so a resumed run sees the same batch.
            candidate = (index + attempt) % len(self.source)
            try:
                image = augment(self.transform, self.open(candidate), seed)
            except BadImage as exc:
                skipped.append((self.source.name(candidate), str(exc)))
                continue
            return {"image": image, "index": candidate, "skipped": skipped}
        raise DataQualityError(f"{self.max_tries} consecutive unreadable images in {self.source.describe()} from "
                               f"{self.source.name(index)}; the data looks broken (see the skipped list)")


class ImageFolderDataset(SourceDataset):
    """Every image under a folder, recursively (labels, i.e. sub-folder names, ignored)."""

    source: FolderSource

    def __init__(self, root: str | Path, transform: Callable, max_tries: int = 32, channels: int = 3):
        super().__init__(FolderSource(root), transform, channels, max_tries)
        self.root = Path(root)

    @property
    def files(self) -> list[Path]:
        return [Path(f) for f in self.source.files]


class FashionMNISTImages(SeededDataset):
    """Fashion-MNIST images (grey 28x28; turned RGB unless ``channels=1``, resized by the transform);
    labels ignored."""

    def __init__(self, transform: Callable | None, split: str = "train", root: str | Path | None = None,
                 channels: int = 3):
        from mixmim.data.fashion_mnist import read_fashion_mnist

        self.images, self.labels = read_fashion_mnist(split, root)
        self.transform = transform
        self.channels, self.mode = channels, mode_of(channels)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        image = Image.fromarray(self.images[index], mode="L")
        return image if self.mode == "L" else image.convert(self.mode)


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

    def __init__(self, transform: Callable | None, epoch_size: int = 512, channels: int = 3):
        self.paths = bundled_photo_paths()
        self.channels, self.mode = channels, mode_of(channels)
        self.photos = [decode(p, self.mode) for p in self.paths]
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
