"""Pretraining augmentation (MixMIM section 8 / MAE): RandomResizedCrop, horizontal flip, normalisation.
Nothing else: masking is the augmentation that matters.

:class:`PretrainTransform` draws exactly what torchvision's v2 ``RandomResizedCrop`` + ``RandomHorizontalFlip``
draw (the same calls, on torch's CPU generator seeded with the sample's seed), and resizes with the
same antialiased bicubic kernel, so with draft mode off it reproduces the v2 pipeline
(:func:`v2_pretrain_transform`) to float rounding. What it adds is doing only the work it must:

- the crop box is drawn from the image *size*, read from the header, before any pixel is decoded;
- a JPEG is then decoded at 1/2, 1/4 or 1/8 scale (PIL's ``Image.draft``, libjpeg's scaled IDCT)
  when the crop still keeps at least ``draft_margin`` times the output resolution at that scale. The
  crop box is then fractional on the reduced image, and PIL's resize (the same antialiased bicubic
  as torchvision's, 0.01 grey levels apart on the same input) takes it as it is. The margin of 2 is
  measured: see docs/data.md (pixel changes no larger than JPEG q90's own);
- the seed costs a few microseconds (:mod:`mixmim.data.seeding`), and the normalisation is one
  multiply-add on the small output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

from mixmim.data.images import Source, finish, mode_of, open_image, oriented_size, to_mode
from mixmim.data.seeding import torch_seeded
from mixmim.utils.imagenet import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402 - re-exported here

# PIL's "L" is 0.299 R + 0.587 G + 0.114 B (ITU-R 601-2). The grey mean follows exactly; the grey std is
# the same weighting of the channel stds: an upper bound (Minkowski), reached when the channels are
# perfectly correlated; photos' channels are strongly correlated. `mixmim stats` measures a data set's own.
LUMA = (0.299, 0.587, 0.114)
IMAGENET_GREY_MEAN = (sum(w * m for w, m in zip(LUMA, IMAGENET_MEAN)),)
IMAGENET_GREY_STD = (sum(w * s for w, s in zip(LUMA, IMAGENET_STD)),)
NORMALIZE = ("imagenet", "dataset", "none")
DRAFT_SCALES = (8, 4, 2)  # what libjpeg's scaled IDCT offers


def imagenet_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mode_of(channels)
    return (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (IMAGENET_GREY_MEAN, IMAGENET_GREY_STD)


def check_stats(mean: Sequence[float], std: Sequence[float],
                channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``mean``/``std`` as tuples, after checking there is one value per channel and every std is positive."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"data.mean {list(mean)} and data.std {list(std)} need {channels} value(s) each, one per "
                         f"channel (data.channels={channels})")
    if any(s <= 0 for s in std):
        raise ValueError(f"data.std {list(std)}: every value must be positive")
    return mean, std


@dataclass(frozen=True)
class CropDraw:
    """What the augmentation of one sample drew: the crop box (in the upright full-size image) and the flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


class PretrainTransform:
    """RandomResizedCrop (bicubic, antialiased) + horizontal flip + normalisation, seeded per sample.

    Call with a PIL image (decoded, or only opened: then draft mode may apply) or a path / bytes, and the
    sample's ``seed`` (None draws from torch's global generator, as a torchvision transform would).
    Returns a float tensor (channels, size, size).
    """

    takes_seed = True

    def __init__(self, size: int, scale: Sequence[float] = (0.2, 1.0), hflip: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, channels: int = 3,
                 draft: bool = True, draft_margin: float = 2.0, ratio: Sequence[float] = (3 / 4, 4 / 3)):
        if draft_margin < 1:
            raise ValueError(f"data.draft_margin={draft_margin}: the decoded crop must keep at least the output "
                             "resolution (>= 1)")
        self.size, self.hflip, self.channels = int(size), bool(hflip), channels
        self.mode = mode_of(channels)
        self.mean, self.std = check_stats(mean, std, channels)
        self.draft, self.draft_margin = bool(draft), float(draft_margin)
        # torchvision draws the box; we only ask it for the parameters (make_params), on a zero-size view.
        self._crop = T.RandomResizedCrop(self.size, scale=tuple(scale), ratio=tuple(ratio),
                                         interpolation=InterpolationMode.BICUBIC, antialias=True)
        std_t = torch.tensor(self.std).view(-1, 1, 1)
        self._gain = 1.0 / (255.0 * std_t)
        self._offset = -torch.tensor(self.mean).view(-1, 1, 1) / std_t

    def __repr__(self) -> str:
        return (f"PretrainTransform(size={self.size}, scale={self._crop.scale}, hflip={self.hflip}, "
                f"channels={self.channels}, draft={self.draft}, draft_margin={self.draft_margin})")

    # ------------------------------------------------------------------ the draws
    def _draw(self, width: int, height: int) -> CropDraw:
        p = self._crop.make_params([torch.empty(1, 1, 1).expand(1, height, width)])
        flip = self.hflip and bool(torch.rand(1) < 0.5)  # v2's RandomHorizontalFlip: flip unless rand >= p
        return CropDraw(p["top"], p["left"], p["height"], p["width"], flip)

    def draw(self, width: int, height: int, seed: int | None = None) -> CropDraw:
        """The crop box and flip of a ``width`` x ``height`` image for ``seed`` (a pure function of the three)."""
        if seed is None:
            return self._draw(width, height)
        with torch_seeded(seed):
            return self._draw(width, height)

    def draft_scale(self, d: CropDraw) -> int:
        """The largest JPEG reduction that keeps ``draft_margin`` x the output resolution in the crop."""
        for scale in DRAFT_SCALES:
            if min(d.height, d.width) >= self.draft_margin * self.size * scale:
                return scale
        return 1

    # ------------------------------------------------------------------ the pixels
    def pixels(self, image: Image.Image, d: CropDraw) -> torch.Tensor:
        """uint8 (channels, size, size): the crop ``d`` of ``image`` resized, flipped."""
        scale = 1.0
        if getattr(image, "tile", None):  # opened, not decoded yet: draft mode may apply
            factor = self.draft_scale(d) if self.draft and image.format == "JPEG" else 1
            if self.draft and (factor > 1 or self.mode == "L"):
                # "L" makes libjpeg output the luma plane only (no chroma upsampling or colour conversion).
                w, h = image.size
                result = image.draft(self.mode, (w // factor, h // factor) if factor > 1 else None)
                if result is not None and factor > 1:
                    scale = w / result[1][2]
            image = finish(image, self.mode)
        elif image.mode != self.mode:
            image = to_mode(image, self.mode)
        if scale == 1.0:
            # The v2 pipeline's ops: integer crop, antialiased bicubic resize of the uint8 tensor.
            crop = image.crop((d.left, d.top, d.left + d.width, d.top + d.height))
            out = F.resize(F.pil_to_tensor(crop), [self.size, self.size], InterpolationMode.BICUBIC, antialias=True)
        else:
            box = (d.left / scale, d.top / scale, (d.left + d.width) / scale, (d.top + d.height) / scale)
            out = F.pil_to_tensor(image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box))
        return out.flip(-1) if d.flip else out

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (C, H, W) -> float (pixels / 255 - mean) / std, contiguous."""
        return pixels.contiguous().float().mul_(self._gain).add_(self._offset)

    def __call__(self, image: Image.Image | Source, seed: int | None = None) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            image = open_image(image)
        width, height = oriented_size(image) if getattr(image, "tile", None) else image.size
        return self.normalize(self.pixels(image, self.draw(width, height, seed)))


def pretrain_transform(img_size: int, scale: Sequence[float] = (0.2, 1.0), hflip: bool = True,
                       mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, channels: int = 3,
                       draft: bool = True, draft_margin: float = 2.0) -> PretrainTransform:
    """The pretraining augmentation of MixMIM section 8 (see :class:`PretrainTransform`)."""
    return PretrainTransform(img_size, scale, hflip, mean, std, channels, draft, draft_margin)


def v2_pretrain_transform(img_size: int, scale: Sequence[float] = (0.2, 1.0), hflip: bool = True,
                          mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    """The same augmentation as torchvision v2 transforms on a decoded image (what the code did before
    :class:`PretrainTransform`, and what torchvision ``ImageFolder`` pipelines use): the reference of the
    tests and of benchmarks/data_throughput.py."""
    steps = [T.ToImage(),
             T.RandomResizedCrop(img_size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC, antialias=True)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
    return T.Compose(steps)


def view_transform(img_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    """Deterministic resize + centre crop, for pictures and ``mixmim reconstruct``."""
    return T.Compose([T.ToImage(), T.Resize(img_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                      T.CenterCrop(img_size), T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))])


def denormalize(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Normalised (B, C, H, W) -> pixels in [0, 1]."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() * s + m).clamp(0, 1)

