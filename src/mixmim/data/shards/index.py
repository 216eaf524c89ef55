"""The index of a shard set: every member's name, offset and size (tar headers only), cached beside the
shards and rebuilt for a shard whose size or modification time changed; the unextracted ImageNet
tarball (a tar of per-class tars) indexed one level down."""

from __future__ import annotations

import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from mixmim.data.shards.layout import IMAGE_EXTS, INDEX_NAME, INDEX_VERSION, ShardError, split_key
from mixmim.utils.files import atomic_write_text

log = logging.getLogger("mixmim")

# ---------------------------------------------------------------------------------------------- index
@dataclass
class ShardEntry:
    """The indexed samples of one shard file (what is cached)."""

    size: int
    mtime_ns: int
    names: list[str] = field(default_factory=list)  # image member names
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)  # -1: none
    classes: list[str] | None = None  # a tar of per-class tars: the inner tars' names


def _truncated(path: Path, member: str, end: int, size: int) -> ShardError:
    return ShardError(f"shard {path} is truncated: member {member} ends at byte {end} but the file has {size} "
                      "bytes (re-copy or re-write the shard)")


def _read_cls(handle, info: tarfile.TarInfo, path: Path) -> int:
    handle.seek(info.offset_data)
    text = handle.read(info.size).decode("ascii", "replace").strip()
    try:
        return int(text)
    except ValueError:
        raise ShardError(f"shard {path}: member {info.name} should hold a class index, holds {text[:40]!r}") from None


def _members(tar: tarfile.TarFile, path: Path) -> list[tarfile.TarInfo]:
    try:
        return list(tar)  # headers only: tarfile seeks over the data
    except tarfile.ReadError as exc:
        raise ShardError(f"shard {path} is truncated or not a tar file ({exc})") from None


def _index_members(tar: tarfile.TarFile, members: list[tarfile.TarInfo], handle, path: Path, file_size: int,
                   label: int = -1) -> ShardEntry:
    """Group the members of one (possibly inner) tar into samples: one image + optional .cls per key."""
    entry = ShardEntry(size=file_size, mtime_ns=0)
    slot: dict[str, int] = {}
    pending_cls: dict[str, int] = {}
    if members and tar.offset + 512 > file_size:
        # Cut at a member boundary: tarfile reads the end of the file as the end of the archive, but a
        # whole archive ends with zero blocks.
        raise ShardError(f"shard {path} is truncated: it ends after member {members[-1].name} without the "
                         "end-of-archive blocks (re-copy or re-write the shard)")
    for info in members:
        if not info.isfile():
            continue
        end = info.offset_data + info.size
        if end > file_size:
            raise _truncated(path, info.name, end, file_size)
        key, ext = split_key(info.name)
        ext = ext.lower()
        if ext in IMAGE_EXTS:
            if key in slot:  # a second image under one key: keep the first, as WebDataset decoders do
                continue
            slot[key] = len(entry.names)
            entry.names.append(info.name)
            entry.offsets.append(info.offset_data)
            entry.sizes.append(info.size)
            entry.labels.append(pending_cls.pop(key, label))
        elif ext == "cls":
            value = _read_cls(handle, info, path)
            if key in slot:
                entry.labels[slot[key]] = value
            else:
                pending_cls[key] = value
    return entry


def index_shard(path: Path) -> ShardEntry:
    """Index one shard file: a WebDataset shard, or a tar of per-class tars (ImageNet's train tarball)."""
    stat = path.stat()
    with open(path, "rb") as handle:
        try:
            outer = tarfile.open(fileobj=handle, mode="r:")
        except tarfile.ReadError as exc:
            raise ShardError(f"shard {path} is truncated or not a tar file ({exc})") from None
        members = _members(outer, path)
        inner = [m for m in members if m.isfile() and m.name.lower().endswith(".tar")]
        if not inner:
            entry = _index_members(outer, members, handle, path, stat.st_size)
        else:
            classes = sorted(Path(m.name).stem for m in inner)
            position = {c: i for i, c in enumerate(classes)}
            entry = ShardEntry(size=stat.st_size, mtime_ns=0, classes=classes)
            for info in sorted(inner, key=lambda m: m.name):
                if info.offset_data + info.size > stat.st_size:
                    raise _truncated(path, info.name, info.offset_data + info.size, stat.st_size)
                handle.seek(info.offset_data)  # offsets inside are then absolute in the outer file
                try:
                    sub = tarfile.open(fileobj=handle, mode="r:")
                except tarfile.ReadError as exc:
                    raise ShardError(f"shard {path}: inner archive {info.name} is not a tar file ({exc})") from None
                part = _index_members(sub, _members(sub, path), handle, path,
                                      min(stat.st_size, info.offset_data + info.size),
                                      label=position[Path(info.name).stem])
                entry.names += [f"{info.name}/{n}" for n in part.names]
                entry.offsets += part.offsets
                entry.sizes += part.sizes
                entry.labels += part.labels
    entry.size, entry.mtime_ns = stat.st_size, stat.st_mtime_ns
    return entry


def _index_location(shards: list[Path]) -> Path:
    first = shards[0]
    return first.with_name(first.name + ".mixmim-index.json") if len(shards) == 1 else first.parent / INDEX_NAME


def _cache_fallback(location: Path) -> Path:
    import hashlib

    root = Path(os.environ.get("MIXMIM_CACHE", Path.home() / ".cache" / "mixmim")) / "shard-index"
    return root / (hashlib.sha1(str(location.resolve()).encode()).hexdigest()[:16] + ".json")


def _read_cache(location: Path) -> dict[str, ShardEntry]:
    for candidate in (location, _cache_fallback(location)):
        try:
            data = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if data.get("version") == INDEX_VERSION:
            return {name: ShardEntry(**value) for name, value in data.get("shards", {}).items()}
    return {}


def _write_cache(location: Path, entries: dict[str, ShardEntry]) -> None:
    text = json.dumps({"version": INDEX_VERSION, "shards": {n: vars(e) for n, e in entries.items()}},
                      separators=(",", ":"))
    for candidate in (location, _cache_fallback(location)):
        try:
            atomic_write_text(candidate, text)
            return
        except OSError:
            continue
    log.warning("could not cache the shard index beside %s nor in %s; it will be rebuilt next time", location,
                _cache_fallback(location).parent)


def load_index(shards: list[Path]) -> dict[str, ShardEntry]:
    """The index of every shard, from the cache where a shard's size and mtime are unchanged."""
    location = _index_location(shards)
    cached = _read_cache(location)
    entries, changed = {}, False
    for path in shards:
        stat = path.stat()
        entry = cached.get(path.name)
        if entry is None or entry.size != stat.st_size or entry.mtime_ns != stat.st_mtime_ns:
            entry, changed = index_shard(path), True
        entries[path.name] = entry
    if changed or set(cached) != set(entries):
        _write_cache(location, entries)
    return entries
