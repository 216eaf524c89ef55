"""Reading shards map-style: a sample is one ``pread`` at its indexed offset, so the sampler's order, the
per-sample seeds and exact resume are those of a folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mixmim.data.images import IMAGE_EXTENSIONS, BadImage, Source
from mixmim.data.shards.index import ShardEntry, load_index
from mixmim.data.shards.layout import shard_files
from mixmim.data.sources import ImageSource


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
        inner = [found for p in self.shards if (found := entries[p.name].classes)]
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
