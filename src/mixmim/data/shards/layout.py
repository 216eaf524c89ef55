"""The layout of a shard set: file names, sizes, WebDataset's member keys, and finding the shards a path
names (a ``.tar``, a folder of them, or ``train/`` + ``val/`` sets)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from mixmim.data.images import IMAGE_EXTENSIONS

SHARD_NAME = "shard-{:06d}.tar"
INDEX_NAME = ".mixmim-index.json"
INDEX_VERSION = 1
IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class ShardError(ValueError):
    """A shard file is truncated or is not a tar archive (one line naming it)."""


def parse_size(text: str | int) -> int:
    """'1GB', '500MB', '2GiB', '123456' -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"--shard-size {text!r}: expected a size such as 1GB, 500MB, 2GiB or a number of bytes")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise ValueError(f"--shard-size {text!r} must be positive")
    return size


def split_key(member: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the member's path up to the first dot of its base name."""
    folder, _, base = member.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


# ---------------------------------------------------------------------------------------------- finding
def shard_files(path: str | Path) -> list[Path] | None:
    """The shards ``path`` names: a ``.tar`` file, or a folder whose files include ``*.tar`` (and no
    images beside them). None when ``path`` is not a shard set."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".tar":
        return [path]
    if not path.is_dir():
        return None
    try:
        names = [e.name for e in os.scandir(path) if e.is_file()]
    except OSError:
        return None
    tars = sorted(n for n in names if n.endswith(".tar") and not n.startswith("."))
    if not tars or any(n.lower().endswith(IMAGE_EXTENSIONS) for n in names):
        return None
    return [path / n for n in tars]


def shard_splits(path: str | Path) -> tuple[list[Path], list[Path]] | None:
    """(train shards, held-out shards) of a folder holding ``train/`` and ``val/`` (or ``test/``) shard sets."""
    path = Path(path).expanduser()
    train = shard_files(path / "train") if (path / "train").is_dir() else None
    for name in ("val", "test"):
        held = shard_files(path / name) if (path / name).is_dir() else None
        if train and held:
            return train, held
    return None
