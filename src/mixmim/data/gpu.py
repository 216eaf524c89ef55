"""JPEG decoding on the GPU (``data.decode=gpu``), an opt-in for when the CPUs cannot keep up.

The workers then only read each image's header (size, EXIF orientation), draw the crop and flip
exactly as :class:`~mixmim.data.transforms.PretrainTransform` does for the same (index, seed), and
pass the encoded bytes on; the training process decodes the whole batch with nvJPEG
(``torchvision.io.decode_jpeg(device="cuda")``), crops, resizes (the same antialiased bicubic kernel,
on the GPU) and normalises. What it guarantees, and what it does not:

- the crop box and the flip of a sample are those of the CPU path (same draws, same seed);
- the pixels are not bit-identical to the CPU path's: nvJPEG's IDCT and chroma upsampling differ
  from libjpeg-turbo's by a grey level here and there, and draft mode does not apply;
- images that are not JPEG are decoded and augmented on the CPU by the workers as usual;
- a JPEG that nvJPEG rejects is decoded on the CPU; if that fails too it is listed as skipped and
  replaced by the batch's previous good image (the item count of a batch never changes).

Without CUDA, :func:`gpu_decoding` warns once and the data set decodes on the CPU. Nothing here needs
a GPU to be tested: :class:`GpuDecoder` runs on any device ``decode_jpeg`` supports, the CPU included.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import cast

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from mixmim.data.datasets import SourceDataset, _key
from mixmim.data.images import BadImage, DataQualityError, decode, orientation, oriented_size
from mixmim.data.transforms import CropDraw, PretrainTransform

_warned = False


def _orient(image: torch.Tensor, value: int) -> torch.Tensor:
    """Turn a (C, H, W) tensor upright by its EXIF orientation ``value`` (what ``ImageOps.exif_transpose`` does)."""
    if value in (5, 6, 7, 8):
        image = image.transpose(-1, -2)
    flips = {2: (-1,), 3: (-1, -2), 4: (-2,), 6: (-1,), 7: (-1, -2), 8: (-2,)}.get(value)
    return image.flip(flips) if flips else image


class EncodedDataset(SourceDataset):
    """Items for GPU decoding: ``{"jpeg": uint8 bytes tensor | None, "pixels": uint8 (C, S, S) | None,
    "draw": CropDraw, "orientation": int, "index", "skipped"}`` (``pixels`` for what is not a JPEG)."""

    transform: PretrainTransform  # __init__ checks it

    def __init__(self, dataset: SourceDataset, device: torch.device | str = "cuda"):
        if not isinstance(dataset.transform, PretrainTransform):
            raise ValueError("data.decode=gpu needs the pretraining transform (PretrainTransform)")
        super().__init__(dataset.source, dataset.transform, dataset.channels, dataset.max_tries)
        self.mean, self.std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
        self.device = str(device)
        self._decoder: GpuDecoder | None = None  # made in the training process, on first use

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_decoder": None}

    def finish_batch(self, batch: dict, device: torch.device | str | None = None) -> dict:
        """Decode, crop, resize and normalise the batch on the GPU (called by the loop on each batch)."""
        if self._decoder is None:
            self._decoder = GpuDecoder(self.transform, device or self.device)
        return self._decoder(batch)

    def __getitem__(self, key: tuple[int, int] | int) -> dict:
        index, seed = _key(key)
        skipped: list[tuple[str, str]] = []
        t: PretrainTransform = self.transform
        for attempt in range(self.max_tries):
            candidate = (index + attempt) % len(self.source)
            try:
                image = self.source.open(candidate)
                turn = orientation(image) if image.format == "JPEG" else 1
                draw = t.draw(*oriented_size(image), seed)
                if image.format == "JPEG" and image.mode in ("RGB", "L", "YCbCr"):
                    image.close()  # only the header was needed
                    data = self.source.read(candidate)
                    if not isinstance(data, (bytes, bytearray, memoryview)):
                        with open(data, "rb") as handle:
                            data = handle.read()
                    return {"jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8), "pixels": None, "draw": draw,
                            "orientation": turn, "index": candidate, "name": self.source.name(candidate),
                            "skipped": skipped}
                return {"jpeg": None, "pixels": t.pixels(image, draw), "draw": draw, "orientation": 1,
                        "index": candidate, "name": self.source.name(candidate), "skipped": skipped}
            except BadImage as exc:
                skipped.append((self.source.name(candidate), str(exc)))
        raise DataQualityError(f"{self.max_tries} consecutive unreadable images in {self.source.describe()} from "
                               f"{self.source.name(index)}; the data looks broken (see the skipped list)")

    @staticmethod
    def collate_fn(items: list[dict]) -> dict:
        return {"jpeg": [it["jpeg"] for it in items], "pixels": [it["pixels"] for it in items],
                "draw": [it["draw"] for it in items], "orientation": [it["orientation"] for it in items],
                "index": torch.tensor([it["index"] for it in items]), "name": [it["name"] for it in items],
                "skipped": [s for it in items for s in it["skipped"]]}


class GpuDecoder:
    """Batch of :class:`EncodedDataset` items -> the batch with ``"image"`` (B, C, S, S), normalised, on ``device``."""

    def __init__(self, transform: PretrainTransform, device: torch.device | str):
        self.t, self.device = transform, torch.device(device)
        self.gain = transform._gain.to(self.device)
        self.offset = transform._offset.to(self.device)

    def _decode(self, jpegs: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        mode = ImageReadMode.RGB if self.t.channels == 3 else ImageReadMode.GRAY
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision points at TorchCodec; same kernels
            try:
                return list(decode_jpeg(list(jpegs), mode=mode, device=self.device))
            except RuntimeError:  # one bad JPEG fails the whole call: find it
                out = []
                for data in jpegs:
                    try:
                        out.append(decode_jpeg(data, mode=mode, device=self.device))
                    except RuntimeError:
                        out.append(None)
                return out

    def _crop(self, image: torch.Tensor, d: CropDraw) -> torch.Tensor:
        crop = image[:, d.top:d.top + d.height, d.left:d.left + d.width]
        out = F.resize(crop, [self.t.size, self.t.size], InterpolationMode.BICUBIC, antialias=True)
        return out.flip(-1) if d.flip else out

    def __call__(self, batch: dict) -> dict:
        where = [i for i, j in enumerate(batch["jpeg"]) if j is not None]
        decoded = dict(zip(where, self._decode([batch["jpeg"][i] for i in where]))) if where else {}
        images: list[torch.Tensor | None] = []
        skipped = list(batch["skipped"])
        for i, draw in enumerate(batch["draw"]):
            if batch["pixels"][i] is not None:
                images.append(batch["pixels"][i].to(self.device, non_blocking=True))
                continue
            image = decoded.get(i)
            if image is None:
                try:  # nvJPEG refused it: the CPU decoder decides whether the file is bad
                    pil = decode(batch["jpeg"][i].numpy().tobytes(), self.t.mode)
                    images.append(self.t.pixels(pil, draw).to(self.device))
                except BadImage as exc:
                    skipped.append((batch["name"][i], f"{exc} (GPU decoding)"))
                    images.append(None)
                continue
            images.append(self._crop(_orient(image, batch["orientation"][i]), draw))
        good = [im for im in images if im is not None]
        if not good:
            raise RuntimeError("no image of the batch could be decoded")
        previous = good[0]
        for i, im in enumerate(images):  # a bad image takes the place of the previous good one (the first: the next)
            if im is None:
                images[i] = previous
            else:
                previous = im
        pixels = torch.stack(cast(list[torch.Tensor], images)).float()  # no None left
        return {**batch, "image": pixels.mul_(self.gain).add_(self.offset), "skipped": skipped}


def gpu_decoding(dataset, device: torch.device | str | None = None):
    """``dataset`` prepared for ``data.decode=gpu``: an :class:`EncodedDataset` (with ``collate`` and
    ``finish_batch``) when CUDA is there, else ``dataset`` itself after one warning."""
    global _warned
    device = torch.device(device) if device is not None else None
    if device is None and not torch.cuda.is_available():
        if not _warned:
            warnings.warn("data.decode=gpu: CUDA is not available, decoding JPEGs on the CPU", RuntimeWarning,
                          stacklevel=2)
            _warned = True
        return dataset
    if not isinstance(dataset, SourceDataset):
        return dataset  # in-memory data sets (bundled photos, Fashion-MNIST) have nothing to decode
    return EncodedDataset(dataset, device or "cuda")
