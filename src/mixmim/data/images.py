"""Reading one image (a file or the bytes of a shard member) into an 8-bit RGB or grey PIL image,
whatever the camera or the converter wrote.

Handles EXIF rotation, grayscale, palette, RGBA/LA (alpha dropped), CMYK, 16-bit and 32-bit integer
or float images. Anything PIL cannot decode raises :class:`BadImage` with the reason, so a data set
can skip and count it instead of crashing hours into a run (issue 7).

Decoding is split in two so that a transform can look at the size before paying for the pixels:
:func:`open_image` reads the header only, :func:`finish` decodes (possibly at reduced scale, after
``Image.draft``) and converts.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mixmim.utils.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MODES = {1: "L", 3: "RGB"}  # channels -> PIL mode
ORIENTATION = 0x0112  # EXIF tag; values 5-8 rotate by 90 degrees (width and height swap)

Source = str | Path | bytes | bytearray | memoryview
# What PIL raises on a corrupt or truncated file (as well as its own errors).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, Image.DecompressionBombError)


class BadImage(UserError):
    """The file could not be turned into an image; ``str(exc)`` says why."""


class DataQualityError(UserError, ValueError):
    """Too many unreadable images: the data set, not the code, needs fixing."""


def mode_of(channels: int) -> str:
    if channels not in MODES:
        raise ValueError(f"data.channels={channels}: expected 1 (grey) or 3 (RGB)")
    return MODES[channels]


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


def to_mode(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """A decoded PIL image of any kind -> 8-bit ``mode`` ("RGB" or "L"), upright by its EXIF orientation."""
    if image.getexif().get(ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # palette transparency is lost by a direct conversion (warning)
    if image.mode in ("RGBA", "LA", "PA") and mode == "L":
        image = image.convert("RGB")  # drop alpha first: PIL's RGBA -> L would keep nothing else anyway
    if image.mode != mode:
        image = image.convert(mode)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, upright by its EXIF orientation."""
    return to_mode(image, "RGB")


def open_image(source: Source) -> Image.Image:
    """Parse the header of a file or of in-memory bytes (no pixels decoded yet): the size, the format
    and the EXIF orientation are known, and ``Image.draft`` may still choose a reduced scale."""
    handle: io.BytesIO | str | Path
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise BadImage("empty file (0 bytes)")
            handle = io.BytesIO(source)
        else:
            if Path(source).stat().st_size == 0:
                raise BadImage("empty file (0 bytes)")
            handle = source
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(handle)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image PIL can identify") from None
    except DECODE_ERRORS as exc:
        raise BadImage(f"{exc.__class__.__name__}: {exc}") from None


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1: upright) read from the header; 1 when the EXIF block cannot be parsed (a
    broken EXIF block is not a broken image: :func:`finish` decides)."""
    try:
        return int(image.getexif().get(ORIENTATION, 1))
    except Exception:
        return 1


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) the image will have once turned upright by its EXIF orientation."""
    width, height = image.size
    return (height, width) if orientation(image) in (5, 6, 7, 8) else (width, height)


def finish(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """Decode an opened image fully (truncated files fail here, not later) and convert it to ``mode``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF and palette warnings are noise for a million-file folder
            image.load()
            out = to_mode(image, mode)
    except DECODE_ERRORS as exc:
        raise BadImage(f"{exc.__class__.__name__}: {exc}") from None
    if out.width < 1 or out.height < 1:
        raise BadImage(f"image has no pixels ({out.width}x{out.height})")
    return out


def decode(source: Source, mode: str = "RGB") -> Image.Image:
    """A file or in-memory bytes -> a fully decoded 8-bit ``mode`` image, or :class:`BadImage`."""
    return finish(open_image(source), mode)


def load_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` fully (truncated files fail here, not later) and return it as RGB."""
    return decode(Path(path), "RGB")
