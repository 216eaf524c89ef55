"""Synthetic images that compress like photographs, for the data benchmarks (no download).

Random noise compresses like nothing real and flat colours like nothing either; a photo has smooth
illumination, objects with edges, texture at every scale and sensor noise. These have all four, so
that JPEG sizes (and so decoding costs) are realistic: about 60 kB for 500x375 and 2.8 MB for
4000x3000 at quality 90 (ImageNet's mean file is ~110 kB; a 12-megapixel camera JPEG is 3-6 MB).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Illumination: a 4x3 field of colours, smoothly upsampled.
    base = Image.fromarray(rng.integers(40, 220, (3, 4, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(int(rng.integers(10, 25))):  # objects with hard edges
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        sx, sy = rng.uniform(0.03, 0.3) * width, rng.uniform(0.03, 0.3) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0 - sx / 2, y0 - sy / 2, x0 + sx / 2, y0 + sy / 2], fill=colour)
    pixels = np.asarray(base, dtype=np.int16).copy()
    for cells, amplitude in ((24, 24), (96, 14), (384, 10), (max(2, width // 3), 10)):  # texture, coarse to fine
        rows = max(2, round(height / width * cells))
        grid = rng.integers(-amplitude, amplitude + 1, (rows, cells), dtype=np.int16) + 128
        field = Image.fromarray(grid.astype(np.uint8), "L").resize((width, height), Image.BILINEAR)
        pixels += np.asarray(field, dtype=np.int16)[..., None] - 128
    pixels += rng.integers(-9, 10, pixels.shape, dtype=np.int16)  # sensor noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_folder(root: Path, count: int, size: tuple[int, int], seed: int, classes: int = 4, quality: int = 90,
                 jitter: float = 0.0) -> list[Path]:
    """``count`` JPEGs in ``classes`` sub-folders; ``jitter`` varies each side by up to that fraction (ImageNet's
    sizes vary around 500x375)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h = (int(s * (1 - jitter * rng.random())) for s in size)
        path = root / f"class{i % classes}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo_like(w, h, seed * 100_003 + i).save(path, "JPEG", quality=quality)
        paths.append(path)
    return paths
