"""Listing the image files under a folder, recursively, without tripping over what real disks hold:
symlink loops, unreadable sub-folders, hidden files."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mixmim.data.images import IMAGE_EXTENSIONS


@dataclass
class ScanResult:
    files: list[Path]
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of what was passed over


def scan_images(root: str | Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> ScanResult:
    """All files under ``root`` with an image extension (case-insensitive), sorted so every rank and
    every restart sees the same order. Follows symlinks but visits each real folder once."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"image folder {root} is not a folder")
    problems: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()
    files: list[Path] = []

    def on_error(exc: OSError) -> None:
        problems.append((str(exc.filename), f"cannot list folder: {exc.strerror or exc}"))

    for folder, dirs, names in os.walk(root, followlinks=True, onerror=on_error):
        try:
            info = os.stat(folder)
        except OSError as exc:
            problems.append((folder, f"cannot stat folder: {exc.strerror or exc}"))
            dirs[:] = []
            continue
        key = (info.st_dev, info.st_ino)
        if key in seen:  # a symlink loop or a second link to a folder already listed
            problems.append((folder, "folder already visited (symlink loop or duplicate link), skipped"))
            dirs[:] = []
            continue
        seen.add(key)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if name.startswith(".") or not name.lower().endswith(extensions):
                continue
            files.append(Path(folder) / name)
    files.sort()
    if not files:
        detail = f" ({len(problems)} folders could not be read)" if problems else ""
        raise ValueError(f"image folder {root} holds no images with extensions {', '.join(extensions)}{detail}")
    return ScanResult(files, problems)
