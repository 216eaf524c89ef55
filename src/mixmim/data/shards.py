"""Images in WebDataset tar shards, read map-style through an index (issue 20).

A network file system or an object store mounted as files is slow at opening millions of small files
and fast at reading large ones. ``mixmim shards`` packs a folder into ``shard-000000.tar`` ... (the
WebDataset layout: members ``<key>.jpg`` with the original bytes, ``<key>.cls`` with the class index,
``<key>.path`` with the original relative path; ``classes.json`` and ``shards.json`` beside them).

Reading does not stream: the members of every shard are indexed once (name, offset, size: tar headers
only, stdlib ``tarfile``) and the index is cached beside the shards, rebuilt for a shard whose size or
modification time changed. A sample is then one ``pread`` at its offset, so the sampler's order, the
per-sample seeds and exact resume are those of a folder. The unextracted ImageNet training tarball (a
tar of per-class tars, ``n01440764.tar`` ...) is indexed the same way, one level down: the inner tars'
members with their offsets in the outer file, the inner tar's name as the class.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from mixmim.data.images import IMAGE_EXTENSIONS, BadImage, Source, decode
from mixmim.data.sources import FolderSource, ImageSource
from mixmim.utils.files import atomic_write_text

log = logging.getLogger("mixmim")

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


# ---------------------------------------------------------------------------------------------- reading
class ShardSource(ImageSource):
    """The images of a set of shards, by index (shard order, then member order). Classes come from
    ``classes.json`` beside the shards, from the inner tars' names, or are the .cls values themselves."""

    def __init__(self, shards: list[Path] | str | Path):
        if not isinstance(shards, list):
            found = shard_files(shards)
            if not found:
                raise FileNotFoundError(f"{shards} holds no .tar shards")
            shards = found
        self.shards = [Path(s) for s in shards]
        entries = load_index(self.shards)
        counts = [len(entries[p.name].names) for p in self.shards]
        if sum(counts) == 0:
            raise ValueError(f"the shards in {self.shards[0].parent} hold no images with extensions "
                             f"{', '.join(IMAGE_EXTENSIONS)}")
        self.counts = counts
        self.shard_of = np.repeat(np.arange(len(self.shards), dtype=np.int32), counts)
        self.offsets = np.concatenate([np.asarray(entries[p.name].offsets, dtype=np.int64) for p in self.shards])
        self.sizes = np.concatenate([np.asarray(entries[p.name].sizes, dtype=np.int64) for p in self.shards])
        self.members = [n for p in self.shards for n in entries[p.name].names]
        labels = np.concatenate([np.asarray(entries[p.name].labels, dtype=np.int64) for p in self.shards])
        self.classes = self._classes(entries, labels)
        self.labels = labels if self.classes is not None else None
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def _classes(self, entries: dict[str, ShardEntry], labels: np.ndarray) -> list[str] | None:
        inner = [entries[p.name].classes for p in self.shards if entries[p.name].classes]
        if inner:
            return sorted({c for names in inner for c in names}) if len(inner) > 1 else inner[0]
        listed = self.shards[0].parent / "classes.json"
        if listed.is_file():
            classes = json.loads(listed.read_text())
            if labels.size and labels.max() >= len(classes):
                raise ValueError(f"{listed} lists {len(classes)} classes but a .cls member holds {labels.max()}")
            return [str(c) for c in classes]
        if labels.size and labels.min() >= 0:
            return [str(i) for i in range(int(labels.max()) + 1)]
        return None

    def __len__(self) -> int:
        return len(self.members)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"] = {}  # file descriptors do not travel to spawned workers
        return state

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker: open its own descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return fd

    def read(self, index: int) -> Source:
        shard, size = int(self.shard_of[index]), int(self.sizes[index])
        data = os.pread(self._fd(shard), size, int(self.offsets[index]))
        if len(data) != size:
            raise BadImage(f"member cut short: {len(data)} of {size} bytes (the shard changed since it was indexed?)")
        return data

    def name(self, index: int) -> str:
        return f"{self.shards[int(self.shard_of[index])].name}:{self.members[index]}"

    def describe(self) -> str:
        return f"{len(self.shards)} shard(s) in {self.shards[0].parent} ({len(self)} images)"

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------- writing
@dataclass
class ShardReport:
    """What ``mixmim shards`` wrote."""

    output: Path
    shards: list[dict]  # {"name", "samples", "bytes"}
    skipped: list[tuple[str, str]]
    classes: list[str] | None

    @property
    def samples(self) -> int:
        return sum(s["samples"] for s in self.shards)


def _check(path: str) -> tuple[str, str | None]:
    """(path, reason it is unreadable or None): the full decode pretraining would do."""
    try:
        decode(path)
        return path, None
    except BadImage as exc:
        return path, str(exc)


def _checked(files: list[str], workers: int) -> Iterable[tuple[str, str | None]]:
    if workers <= 1:
        yield from map(_check, files)
        return
    import multiprocessing

    with multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn").Pool(workers) as pool:
        yield from pool.imap(_check, files, chunksize=16)


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed metadata: the same folder gives the same bytes
    return info, data


def _tar_bytes(size: int) -> int:
    return 512 + (size + 511) // 512 * 512


def _file_bytes(archive: int) -> int:
    # tarfile pads the archive to whole 10240-byte records when it closes.
    return -(-archive // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class _ShardWriter:
    """Streams samples into ``shard-NNNNNN.tar`` files of at most ``shard_size`` bytes (a sample larger than
    that gets a shard of its own). Each shard is written to a temporary file, flushed to disk, then
    renamed: a killed run leaves whole shards and no half-written one."""

    def __init__(self, output: Path, shard_size: int):
        self.output, self.shard_size = output, shard_size
        self.done: list[dict] = []
        self.tar: tarfile.TarFile | None = None
        self.tmp: Path | None = None
        self.bytes = self.samples = 0

    def add(self, sample: list[tuple[tarfile.TarInfo, bytes]]) -> None:
        extra = sum(_tar_bytes(info.size) for info, _ in sample)
        if self.tar is not None and _file_bytes(self.bytes + extra) > self.shard_size:
            self.flush()
        if self.tar is None:
            fd, name = tempfile.mkstemp(prefix=".shard-", suffix=".tmp", dir=self.output)
            os.close(fd)
            self.tmp = Path(name)
            self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
            self.bytes, self.samples = 1024, 0  # 1024: the end-of-archive blocks
        for info, data in sample:
            self.tar.addfile(info, io.BytesIO(data))
        self.bytes += extra
        self.samples += 1

    def flush(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        with open(self.tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        path = self.output / SHARD_NAME.format(len(self.done))
        os.replace(self.tmp, path)
        self.done.append({"name": path.name, "samples": self.samples, "bytes": path.stat().st_size})
        self.tar = self.tmp = None

    def abort(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tmp.unlink(missing_ok=True)
            self.tar = self.tmp = None


def write_shard_set(source: FolderSource, output: Path, shard_size: int, classes: list[str] | None,
                    workers: int = 1, progress: Callable[[int, int], None] | None = None) -> ShardReport:
    """Pack the readable images of ``source`` into ``output``/shard-*.tar (the order of the folder)."""
    output.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(output, shard_size)
    skipped = list(source.scan_problems)
    index = {c: i for i, c in enumerate(classes)} if classes else None
    try:
        for n, (path, reason) in enumerate(_checked(source.files, workers)):
            if progress is not None:
                progress(n + 1, len(source))
            if reason is not None:
                skipped.append((path, reason))
                continue
            rel = Path(path).relative_to(source.root)
            key = f"{n:09d}"  # the folder's sorted position: keys sort like the folder
            sample = [_member(f"{key}.{rel.suffix.lower().lstrip('.')}", Path(path).read_bytes()),
                      _member(f"{key}.path", str(rel).encode())]
            if index is not None:
                sample.append(_member(f"{key}.cls", str(index[rel.parts[0]]).encode()))
            writer.add(sample)
        writer.flush()
    except BaseException:
        writer.abort()
        raise
    if not writer.done:
        raise ValueError(f"no readable image in {source.root} ({len(skipped)} unreadable, see the list above)")
    report = ShardReport(output, writer.done, skipped, classes)
    if classes:
        atomic_write_text(output / "classes.json", json.dumps(classes, indent=0) + "\n")
    if skipped:
        atomic_write_text(output / "skipped.txt", "".join(f"{p}\t{r}\n" for p, r in skipped))
    manifest = {"format": "webdataset", "source": str(source.root), "samples": report.samples,
                "skipped": len(skipped), "classes": classes, "shards": writer.done}
    atomic_write_text(output / "shards.json", json.dumps(manifest, indent=1) + "\n")
    return report


def write_shards(data: str | Path, output: str | Path, shard_size: int | str = "1GB", workers: int = 1,
                 overwrite: bool = False, progress: Callable[[int, int], None] | None = None) -> list[ShardReport]:
    """``mixmim shards``: a folder (``DATA/<class>/*.jpg``, or ``DATA/train`` + ``DATA/val``) -> shard set(s)
    (``OUTPUT/shard-*.tar``, or ``OUTPUT/train/`` + ``OUTPUT/val/`` with the training split's classes)."""
    data, output = Path(data).expanduser(), Path(output).expanduser()
    size = parse_size(shard_size)
    if not data.is_dir():
        raise FileNotFoundError(f"image folder {data} does not exist" if not data.exists()
                                else f"--data {data} is a file, expected an image folder")
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file, expected a folder for the shards")
    if workers < 1:
        raise ValueError(f"--workers {workers}: expected at least 1")
    held = next((data / n for n in ("val", "test") if (data / n).is_dir()), None)
    if (data / "train").is_dir() and held is not None:
        jobs = [(FolderSource(data / "train"), output / "train"), (FolderSource(held), output / held.name)]
        if jobs[1][0].classes != jobs[0][0].classes:
            raise ValueError(f"{held} has classes {jobs[1][0].classes}, {data / 'train'} has {jobs[0][0].classes}")
    else:
        jobs = [(FolderSource(data), output)]
    # Every check passes before anything is deleted; then only files of our own earlier shard sets.
    earlier = [previous_shard_files(out, overwrite) for _, out in jobs]
    if not overwrite and output.is_dir() and shard_splits(output):
        raise ValueError(f"{output} already holds shards; pass --overwrite to replace them")
    for files in earlier:
        for old in files:
            old.unlink(missing_ok=True)
    classes = jobs[0][0].classes
    return [write_shard_set(src, out, size, classes, workers, progress) for src, out in jobs]


def previous_shard_files(output: Path, overwrite: bool) -> list[Path]:
    """The files of a shard set this command wrote earlier into ``output`` (its ``shards.json`` lists
    them), which ``--overwrite`` replaces. Refused in one line: shards there without ``--overwrite``, and
    ``.tar`` files no manifest of ours lists (they would be read as part of the new set, and are not ours
    to delete)."""
    if not output.is_dir():
        return []
    listed: list[str] = []
    manifest = output / "shards.json"
    if manifest.is_file():
        try:
            info = json.loads(manifest.read_text())
            listed = [str(s["name"]) for s in info["shards"]] if info.get("format") == "webdataset" else []
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            listed = []
    listed = [n for n in listed if n == Path(n).name and n.endswith(".tar")]  # names, never paths elsewhere
    tars = sorted(p.name for p in output.iterdir() if p.is_file() and p.name.endswith(".tar"))
    foreign = [n for n in tars if n not in listed]
    if foreign:
        raise ValueError(f"{output} holds .tar files mixmim did not write ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); choose an empty folder for the shards")
    if tars and not overwrite:
        raise ValueError(f"{output} already holds shards; pass --overwrite to replace them")
    if not listed:
        return []
    ours = [output / n for n in listed] + [output / n for n in ("skipped.txt", "classes.json", INDEX_NAME)]
    ours += [p for p in output.iterdir() if p.name.startswith(".shard-") and p.name.endswith(".tmp")]  # killed writes
    return [p for p in ours if p.is_file()] + [manifest]
