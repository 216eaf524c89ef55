"""Where encoded images come from, map-style: ``source.read(i)`` is the i-th image's file path or bytes,
``source.name(i)`` what to call it in a report, ``source.label(i)`` its class (or -1).

Every source is indexed, not streamed, so :class:`~mixmim.data.sampler.ResumableSampler`'s order (a
pure function of seed, epoch and position, independent of the world size) and exact resume hold for
all of them: a folder (:class:`FolderSource`), WebDataset shards read through an index
(:class:`~mixmim.data.shards.ShardSource`), a Hugging Face dataset (:class:`~mixmim.data.hf.HFSource`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mixmim.data.images import Source, finish, open_image
from mixmim.data.scan import scan_images


class MissingExtra(ImportError, ValueError):
    """An optional dependency is not installed (a ValueError too, so that the command line says it in one line)."""


class ImageSource:
    """Encoded images by index. ``classes`` is None for an unlabelled source; ``scan_problems`` lists
    (path, reason) of what the listing passed over (unreadable folders, ...)."""

    classes: list[str] | None = None
    scan_problems: list[tuple[str, str]] = []
    labels: np.ndarray | None = None  # int64 class per image (-1: none), when the source has classes

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, index: int) -> Source:
        raise NotImplementedError

    def name(self, index: int) -> str:
        raise NotImplementedError

    def label(self, index: int) -> int:
        return int(self.labels[index]) if self.labels is not None else -1

    def open(self, index: int) -> Image.Image:
        """The image with its header read and its pixels not yet decoded (draft mode may still apply)."""
        return open_image(self.read(index))

    def load(self, index: int, mode: str = "RGB") -> Image.Image:
        """The image decoded and converted to ``mode``; :class:`~mixmim.data.images.BadImage` if it cannot be."""
        return finish(self.open(index), mode)

    def describe(self) -> str:
        return f"{type(self).__name__} of {len(self)} images"


class FolderSource(ImageSource):
    """Every image file under ``root``, recursively, sorted. When every image lies inside a top-level
    sub-folder, those sub-folders are the classes (sorted names; ``DATA/<class>/.../*.jpg``).

    ``labelled=True`` (fine-tuning, probing): the classes are the sub-folders, all of them (a class
    folder without images stays a class, so that the caller can say so), and images outside them are
    left out."""

    def __init__(self, root: str | Path, labelled: bool = False):
        self.root = Path(root).expanduser()
        if labelled:
            if not self.root.is_dir():
                raise (ValueError(f"image folder {self.root} is a file, expected a folder with one sub-folder "
                                  "per class")
                       if self.root.exists() else FileNotFoundError(f"image folder {self.root} does not exist"))
            dirs = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not dirs:
                raise ValueError(f"image folder {self.root} has no class sub-folders")
        scan = scan_images(self.root)
        tops = [p.relative_to(self.root).parts for p in scan.files]
        if labelled:
            known = set(dirs)
            keep = [len(parts) > 1 and parts[0] in known for parts in tops]
            scan.files = [p for p, k in zip(scan.files, keep) if k]
            tops = [t for t, k in zip(tops, keep) if k]
        # Plain strings, not Path objects: a million of them are shared by forked workers more cheaply.
        self.files = [str(p) for p in scan.files]
        self.scan_problems = scan.problems
        if labelled or (tops and all(len(parts) > 1 for parts in tops)):
            self.classes = dirs if labelled else sorted({parts[0] for parts in tops})
            index = {c: i for i, c in enumerate(self.classes)}
            self.labels = np.array([index[parts[0]] for parts in tops], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> Source:
        return self.files[index]

    def name(self, index: int) -> str:
        return self.files[index]

    def describe(self) -> str:
        return f"folder {self.root} ({len(self)} images)"


class ArraySource(ImageSource):
    """Decoded images held in memory (uint8 (N, H, W) grey or (N, H, W, 3) RGB), e.g. Fashion-MNIST."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, classes: Sequence[str] | None = None,
                 name: str = "array"):
        self.images, self._name = images, name
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.images)

    def open(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def load(self, index: int, mode: str = "RGB") -> Image.Image:
        image = self.open(index)
        return image if image.mode == mode else image.convert(mode)

    def read(self, index: int) -> Source:
        raise NotImplementedError("an ArraySource holds decoded pixels; use open() or load()")

    def name(self, index: int) -> str:
        return f"{self._name}[{index}]"

    def describe(self) -> str:
        return f"{self._name} ({len(self)} images)"


class SubsetSource(ImageSource):
    """The images ``indices`` of another source, in that order (a split or a seeded subset)."""

    def __init__(self, source: ImageSource, indices: Sequence[int] | np.ndarray):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.classes = source.classes
        self.labels = source.labels[self.indices] if source.labels is not None else None
        self.scan_problems = source.scan_problems

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, index: int) -> Source:
        return self.source.read(int(self.indices[index]))

    def open(self, index: int) -> Image.Image:
        return self.source.open(int(self.indices[index]))

    def load(self, index: int, mode: str = "RGB") -> Image.Image:
        return self.source.load(int(self.indices[index]), mode)

    def name(self, index: int) -> str:
        return self.source.name(int(self.indices[index]))

    def describe(self) -> str:
        return f"{len(self)} images of {self.source.describe()}"
