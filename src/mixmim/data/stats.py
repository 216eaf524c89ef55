"""Per-channel mean and standard deviation of a data set's pixels (issue 23): what ``data.mean`` and
``data.std`` should be for data that is not ImageNet (grey X-rays, satellite tiles, ...).

The statistics are over every pixel of the decoded images scaled to [0, 1] (as ImageNet's
0.485/0.456/0.406 and 0.229/0.224/0.225 are), of the whole set or of a seeded sample of ``limit``
images; unreadable images are passed over and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import DataLoader, Dataset

from mixmim.data.images import BadImage, mode_of


@dataclass
class PixelStats:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    images: int  # images measured
    pixels: int  # per channel
    skipped: list[tuple[str, str]] = field(default_factory=list)


class _Sums(Dataset):
    """Per image: (sum, sum of squares, pixel count) per channel, in float64."""

    def __init__(self, load, names, indices: np.ndarray, mode: str):
        self.load, self.names, self.indices, self.mode = load, names, indices, mode

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = int(self.indices[i])
        try:
            image = self.load(index, self.mode)
        except BadImage as exc:
            return None, (self.names(index), str(exc))
        x = np.asarray(image, dtype=np.float64).reshape(image.height * image.width, -1) / 255.0
        return (x.sum(0), np.square(x).sum(0), x.shape[0]), None


def _as_list(items: list) -> list:
    return items


def _loader_of(data):
    """(load(index, mode), name(index), count) of an image source, a data set with ``load`` or a path."""
    from mixmim.data.sources import ImageSource

    if isinstance(data, ImageSource):
        return data.load, data.name, len(data)
    if hasattr(data, "source") and isinstance(data.source, ImageSource):  # a SourceDataset
        return data.source.load, data.source.name, len(data.source)
    if hasattr(data, "load"):  # Fashion-MNIST / bundled photos: load(index) gives a decoded image
        def load(index: int, mode: str):
            image = data.load(index)
            return image if image.mode == mode else image.convert(mode)
        n = len(getattr(data, "photos", None) or data)  # the bundled photos cycle: each photo once
        return load, (lambda i: f"image {i}"), n
    from mixmim.data import open_source

    return _loader_of(open_source(data))


def dataset_stats(data, channels: int = 3, limit: int | None = None, seed: int = 0,
                  num_workers: int = 0) -> PixelStats:
    """Mean and std per channel of ``data`` (an image source, a pretraining data set, or a path / name
    that :func:`mixmim.data.open_source` understands), over all its images or a seeded sample of
    ``limit``; ``num_workers`` DataLoader processes decode."""
    mode = mode_of(channels)
    load, names, n = _loader_of(data)
    indices = np.arange(n)
    if limit is not None and limit < n:
        indices = np.sort(np.random.default_rng(seed).permutation(n)[:limit])
    loader = DataLoader(_Sums(load, names, indices, mode), batch_size=16, num_workers=num_workers,
                        collate_fn=_as_list)
    total = np.zeros(channels)
    squares = np.zeros(channels)
    pixels = images = 0
    skipped: list[tuple[str, str]] = []
    for batch in loader:
        for sums, bad in batch:
            if bad is not None:
                skipped.append(bad)
                continue
            total += sums[0]
            squares += sums[1]
            pixels += sums[2]
            images += 1
    if images == 0:
        raise ValueError(f"no readable image to measure ({len(skipped)} unreadable)")
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean**2, 0.0))
    return PixelStats(tuple(float(m) for m in mean), tuple(float(s) for s in std), images, pixels, skipped)

