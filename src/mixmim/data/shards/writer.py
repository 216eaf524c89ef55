"""``mixmim shards``: a folder packed into WebDataset tar shards, each written to a temporary file and
renamed whole; an earlier set replaced only with ``--overwrite`` and only the files its manifest lists."""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from mixmim.data.images import BadImage, decode
from mixmim.data.shards.layout import INDEX_NAME, SHARD_NAME, parse_size, shard_splits
from mixmim.data.sources import FolderSource
from mixmim.utils.files import atomic_write_text


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
        assert self.tmp is not None  # set together with self.tar
        self.tar.close()
        with open(self.tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        path = self.output / SHARD_NAME.format(len(self.done))
        os.replace(self.tmp, path)
        self.done.append({"name": path.name, "samples": self.samples, "bytes": path.stat().st_size})
        self.tar = self.tmp = None

    def abort(self) -> None:
        if self.tar is not None:
            assert self.tmp is not None  # set together with self.tar
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
