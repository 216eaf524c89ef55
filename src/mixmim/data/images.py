"""Reading one image file into an RGB PIL image, whatever the camera or the converter wrote.

Handles EXIF rotation, grayscale, palette, RGBA/LA (alpha dropped), CMYK, 16-bit and 32-bit integer
or float images. Anything PIL cannot decode raises :class:`BadImage` with the reason, so a data set
can skip and count it instead of crashing hours into a run (issue 7).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class BadImage(Exception):
    """The file could not be turned into an RGB image; ``str(exc)`` says why."""


def _to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit integer and float images: rescale to 0..255 using the type's range (not clipping,
    which would turn a 16-bit photo white)."""
    array = np.asarray(image)
    if array.dtype == np.uint16 or image.mode.startswith("I;16"):
        array = array.astype(np.float32) / 257.0
    elif np.issubdtype(array.dtype, np.integer):
        peak = float(array.max()) if array.size else 0.0
        array = array.astype(np.float32) * (255.0 / (65535.0 if peak > 255 else 255.0))
    else:  # float images: assume 0..1 when they look like it, otherwise stretch
        array = array.astype(np.float32)
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        if low >= 0.0 and high <= 1.0:
            array = array * 255.0
        elif high > low:
            array = (array - low) * (255.0 / (high - low))
    return Image.fromarray(np.clip(np.nan_to_num(array), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, upright by its EXIF orientation."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # palette transparency is lost by a direct RGB conversion warning
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def load_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` fully (truncated files fail here, not later) and return it as RGB."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF and palette warnings are noise for a million-file folder
            with Image.open(path) as handle:
                handle.load()
                image = to_rgb(handle)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image PIL can identify") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadImage(f"{exc.__class__.__name__}: {exc}") from None
    if image.width < 1 or image.height < 1:
        raise BadImage(f"image has no pixels ({image.width}x{image.height})")
    return image
