"""Semantic segmentation data and the ADE20K protocol's augmentation (BEiT's settings, which MixMIM section
8, SimMIM and MixedAE reuse; mmsegmentation's ADE20K pipeline).

Layouts, found from ``--data DIR`` alone:

- ADE20K as it is on disk: ``DIR/images/{training,validation}/*.jpg`` with
  ``DIR/annotations/{training,validation}/*.png`` (``DIR`` is ``ADEChallengeData2016`` or holds it);
  label 0 is "other", left out of the 150 classes (``reduce_zero_label``: 0 becomes 255, ignored, and
  1..150 become 0..149);
- a folder of ``images/<stem>.*`` with ``masks/<stem>.png`` (255 = ignore), split by ``data.val_path``
  or a seeded ``data.val_fraction``.

Training items (``ds[(index, seed)]``, a pure function of both): random resize of the image to a ratio
in ``ratio_range`` of ``scale`` (2048 x 512, aspect kept), a ``crop x crop`` crop in which no class
covers more than ``cat_max_ratio`` of the labelled pixels (up to ten draws), a flip with probability
1/2, photometric distortion, ImageNet normalisation, padding to the crop (image 0, label 255).
Evaluation items: the image resized to ``scale`` (aspect kept) and the label at the image's original
resolution (mIoU is counted there).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mixmim.data.images import IMAGE_EXTENSIONS, BadImage, load_rgb
from mixmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mixmim.utils.errors import UserError

log = logging.getLogger("mixmim")
IGNORE = 255


class SegmentationError(UserError, ValueError):
    """A segmentation folder or mask that cannot be used (one line naming the file)."""


# --------------------------------------------------------------------------------------------- layouts
def ade20k_root(root: str | Path) -> Path | None:
    """The ADE20K folder in ``root`` (``root`` itself or ``root/ADEChallengeData2016``), or None."""
    root = Path(root).expanduser()
    for candidate in (root, root / "ADEChallengeData2016"):
        if (candidate / "images" / "training").is_dir() and (candidate / "annotations" / "training").is_dir():
            return candidate
    return None


def _pairs(images: Path, masks: Path) -> list[tuple[Path, Path]]:
    by_stem = {p.stem: p for p in sorted(images.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    return [(by_stem[s], masks / f"{s}.png") for s in sorted(by_stem) if (masks / f"{s}.png").is_file()]


def ade20k_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, annotation) pairs of ADE20K's ``training`` or ``validation`` split."""
    images, notes = root / "images" / split, root / "annotations" / split
    if not images.is_dir() or not notes.is_dir():
        raise SegmentationError(f"{root} is not ADE20K: expected images/{split}/ and annotations/{split}/")
    pairs = _pairs(images, notes)
    if not pairs:
        raise SegmentationError(f"{images}: no image has an annotation annotations/{split}/<same stem>.png")
    return pairs


def folder_pairs(root: str | Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of ``root/images`` and ``root/masks``."""
    root = Path(root).expanduser()
    images, masks = root / "images", root / "masks"
    for folder in (images, masks):
        if not folder.is_dir():
            raise SegmentationError(f"segmentation folder {folder} does not exist (expected images/ and masks/, or "
                                    "ADE20K's images/training and annotations/training)")
    pairs = _pairs(images, masks)
    if not pairs:
        raise SegmentationError(f"{root}: no image in images/ has a mask masks/<same stem>.png")
    return pairs


def split_pairs(pairs: Sequence[tuple[Path, Path]], fraction: float, seed: int
                ) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    """A seeded held-out ``fraction`` (at least one pair; with one pair, train and evaluate on it)."""
    if len(pairs) < 2:
        return list(pairs), list(pairs)
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = min(len(pairs) - 1, max(1, round(fraction * len(pairs))))
    return [pairs[i] for i in sorted(order[n_val:])], [pairs[i] for i in sorted(order[:n_val])]


# --------------------------------------------------------------------------------------------- reading
def read_mask(path: Path, reduce_zero_label: bool) -> np.ndarray:
    """A label map as int64; with ``reduce_zero_label`` 0 becomes 255 and every other label one less."""
    try:
        with Image.open(path) as handle:
            if handle.mode not in ("L", "P", "I", "I;16"):
                raise SegmentationError(f"mask {path} has mode {handle.mode}: expected a single-channel label map")
            mask = np.array(handle).astype(np.int64)
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise SegmentationError(f"cannot read mask {path}: {exc}") from None
    if reduce_zero_label:  # mmsegmentation's: 0 -> 255, k -> k - 1 (255 stays ignored)
        ignored = mask == IGNORE
        mask = np.where(mask == 0, IGNORE, mask - 1)
        mask[ignored] = IGNORE
    return mask


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's ``rescale_size`` with ``keep_ratio``: the largest size of this aspect whose long side is at
    most ``max(scale)`` and whose short side at most ``min(scale)``."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def _resize(image: np.ndarray, mask: np.ndarray | None, size: tuple[int, int]):
    h, w = size
    out = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    if mask is None:
        return out, None
    return out, np.asarray(Image.fromarray(mask.astype(np.int32)).resize((w, h), Image.Resampling.NEAREST)).astype(
        np.int64)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmsegmentation's ``PhotoMetricDistortion`` on a uint8 RGB image: brightness (+-32), contrast
    (x 0.5-1.5, before or after the colour changes), saturation (x 0.5-1.5 in HSV) and hue (+-18 of
    OpenCV's 180), each with probability 1/2, clipped to 0-255 after each."""
    x = image.astype(np.float32)

    def contrast(x: np.ndarray) -> np.ndarray:
        return np.clip(x * rng.uniform(0.5, 1.5), 0, 255) if rng.integers(2) else x

    if rng.integers(2):
        x = np.clip(x + rng.uniform(-32, 32), 0, 255)
    contrast_first = bool(rng.integers(2))
    if contrast_first:
        x = contrast(x)
    saturate, shift = rng.integers(2), rng.integers(2)
    alpha, delta = rng.uniform(0.5, 1.5), int(rng.integers(-18, 19))
    if saturate or shift:
        hsv = np.asarray(Image.fromarray(x.astype(np.uint8)).convert("HSV")).astype(np.float32)
        if saturate:
            hsv[..., 1] = np.clip(hsv[..., 1] * alpha, 0, 255)
        if shift:  # PIL's hue runs over 0-255 where OpenCV's over 0-180
            hsv[..., 0] = (hsv[..., 0] + delta * 256 / 180) % 256
        x = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
    if not contrast_first:
        x = contrast(x)
    return x.astype(np.uint8)


# --------------------------------------------------------------------------------------------- data set
@dataclass
class Protocol:
    """The ADE20K protocol's sizes (BEiT / mmsegmentation defaults)."""

    crop: int = 512
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    photometric: bool = True


class SegmentationData(torch.utils.data.Dataset):
    """(image, label map) pairs with the protocol's training augmentation or its evaluation items."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], protocol: Protocol, reduce_zero_label: bool = False,
                 num_classes: int | None = None, max_tries: int = 32):
        if not pairs:
            raise SegmentationError("no (image, mask) pair to read")
        self.pairs, self.protocol, self.reduce_zero_label = list(pairs), protocol, reduce_zero_label
        self.num_classes, self.max_tries = num_classes, max_tries
        self.mean = np.array(IMAGENET_MEAN, dtype=np.float32) * 255
        self.std = np.array(IMAGENET_STD, dtype=np.float32) * 255

    def __len__(self) -> int:
        return len(self.pairs)

    def mask(self, index: int) -> np.ndarray:
        mask = read_mask(self.pairs[index][1], self.reduce_zero_label)
        if self.num_classes is not None:
            labels = mask[mask != IGNORE]
            if labels.size and int(labels.max()) >= self.num_classes:
                found = int(labels.max()) + int(self.reduce_zero_label)  # the value in the file
                shift = " after reduce_zero_label's shift" if self.reduce_zero_label else ""
                raise SegmentationError(f"mask {self.pairs[index][1]} holds label {found}, above the "
                                        f"{self.num_classes} classes (labels 0-{self.num_classes - 1}{shift}; "
                                        "255 = ignore)")
        return mask

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The image (uint8 RGB) and its label map, checked to be the same size."""
        image_path, mask_path = self.pairs[index]
        image = np.asarray(load_rgb(image_path))
        mask = self.mask(index)
        if mask.shape != image.shape[:2]:
            raise SegmentationError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]}, its image {image_path} "
                                    f"{image.shape[1]}x{image.shape[0]}")
        return image, mask

    def normalise(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((image.astype(np.float32) - self.mean) / self.std).transpose(2, 0, 1).copy())

    def __getitem__(self, key) -> dict:
        index, seed = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), int(key))
        skipped = []
        for attempt in range(self.max_tries):
            candidate = (index + attempt) % len(self.pairs)
            try:
                image, mask = self.read(candidate)
            except BadImage as exc:
                skipped.append((str(self.pairs[candidate][0]), str(exc)))
                continue
            x, y = self.augment(image, mask, np.random.default_rng([seed, candidate]))
            return {"image": x, "label": y, "index": candidate, "skipped": skipped}
        raise SegmentationError(f"{self.max_tries} consecutive unreadable images from {self.pairs[index][0]}")

    def augment(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training pipeline of the module docstring."""
        p = self.protocol
        ratio = rng.uniform(*p.ratio_range)
        size = rescale_size(image.shape[0], image.shape[1], (int(p.scale[0] * ratio), int(p.scale[1] * ratio)))
        image, resized = _resize(image, mask, size)
        assert resized is not None
        top, left = self._crop_offsets(resized, rng)
        image = image[top:top + p.crop, left:left + p.crop]
        mask = resized[top:top + p.crop, left:left + p.crop]
        if rng.integers(2):
            image, mask = image[:, ::-1], mask[:, ::-1]
        if p.photometric:
            image = photometric_distortion(np.ascontiguousarray(image), rng)
        x = self.normalise(np.ascontiguousarray(image))
        y = torch.from_numpy(np.ascontiguousarray(mask))
        h, w = y.shape
        return F.pad(x, (0, p.crop - w, 0, p.crop - h)), F.pad(y, (0, p.crop - w, 0, p.crop - h), value=IGNORE)

    def _crop_offsets(self, mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
        """mmsegmentation's ``RandomCrop`` with ``cat_max_ratio``: redraw (up to ten times) while one class
        covers at least that share of the crop's labelled pixels."""
        crop = self.protocol.crop
        margin_h, margin_w = max(mask.shape[0] - crop, 0), max(mask.shape[1] - crop, 0)
        top, left = int(rng.integers(margin_h + 1)), int(rng.integers(margin_w + 1))
        if self.protocol.cat_max_ratio < 1.0:
            for _ in range(10):
                window = mask[top:top + crop, left:left + crop]
                _, counts = np.unique(window[window != IGNORE], return_counts=True)
                if len(counts) > 1 and counts.max() / counts.sum() < self.protocol.cat_max_ratio:
                    break
                top, left = int(rng.integers(margin_h + 1)), int(rng.integers(margin_w + 1))
        return top, left

    def evaluation_item(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the normalised image resized to ``scale``, aspect kept; the label map at the original size)."""
        return self.evaluation_input(*self.read(index))

    def evaluation_input(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`evaluation_item` of an image and mask already read."""
        resized, _ = _resize(image, None, rescale_size(image.shape[0], image.shape[1], self.protocol.scale))
        return self.normalise(resized), torch.from_numpy(mask)


def infer_num_classes(data: SegmentationData) -> int:
    """1 + the largest label (other than 255, after ``reduce_zero_label``) in the masks."""
    top = -1
    for i in range(len(data)):
        values = np.unique(data.mask(i))
        values = values[values != IGNORE]
        if values.size:
            top = max(top, int(values.max()))
    if top < 0:
        raise SegmentationError(f"every mask pixel of {data.pairs[0][1].parent} is ignored (255); nothing to learn")
    return top + 1
