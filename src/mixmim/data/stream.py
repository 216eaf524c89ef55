"""Sequential shard streaming (``data.source=stream``), an opt-in for object stores where random access
(one ranged read per image) costs too much: every (rank, DataLoader worker) reads whole shards of its
own, front to back.

What changes against the map-style sources, and what holds:

- the order depends on the world size and the number of workers: epoch ``e`` deals the shards, in a
  permutation seeded by (seed, e), round-robin to the ``world_size x num_workers`` readers; each reads
  its shards in turn and the loader interleaves the workers' batches. A sample's augmentation does not
  depend on it: its seed is a function of (seed, epoch, shard, position in the shard);
- every reader yields the same number of batches per epoch (so that DDP ranks stay in step): a reader
  whose shards run out starts them again, so an epoch sees every image about once, not exactly once;
- resume (``set_epoch(epoch, start_batch)``): every reader skips, by reading through them, the samples
  it had already produced. On the same world size and worker count this is exact (unless unreadable
  members lie in the skipped part: they are counted, not decoded); on another one the readers' shares
  differ, so the resumed epoch sees its images approximately once;
- unreadable members are skipped and listed (in the next item's ``skipped``), not replaced.

The number of samples per shard comes from ``shards.json`` (written by ``mixmim shards``) or, for
local files, from the shard index. Shards are local paths or any URL ``fsspec`` opens (``s3://``, ...).
"""

from __future__ import annotations

import json
import math
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from mixmim.data.images import IMAGE_EXTENSIONS, BadImage, decode, mode_of, open_image
from mixmim.data.sampler import sample_seed
from mixmim.data.seeding import augment
from mixmim.data.shards import split_key
from mixmim.data.sources import MissingExtra

_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


def _open(url: str):
    if "://" in url:
        try:
            import fsspec
        except ImportError:
            raise MissingExtra(f"streaming {url} needs fsspec (pip install fsspec and the store's backend)") from None
        return fsspec.open(url, "rb").open()
    return open(url, "rb")


def shard_counts(shards: list[str]) -> list[int]:
    """Samples per shard: from ``shards.json`` beside the first shard, else from the (local) shard index."""
    first = shards[0]
    folder = first.rsplit("/", 1)[0] if "/" in first else "."
    try:
        with _open(f"{folder}/shards.json") as handle:
            listed = {s["name"]: int(s["samples"]) for s in json.load(handle)["shards"]}
        return [listed[s.rsplit("/", 1)[-1]] for s in shards]
    except (OSError, KeyError, ValueError):
        pass
    if any("://" in s for s in shards):
        raise ValueError(f"streaming {folder}: no shards.json listing the samples of every shard (write the shards "
                         "with 'mixmim shards', or copy its shards.json beside them)")
    from mixmim.data.shards import load_index

    entries = load_index([Path(s) for s in shards])
    return [len(entries[Path(s).name].names) for s in shards]


class ShardStream(IterableDataset):
    """Items ``{"image", "index", "skipped"}`` (``index``: shard number x 2^24 + position in the shard), read
    sequentially; this rank yields ``batches_per_epoch`` batches of ``batch_size`` per epoch."""

    mean: tuple[float, ...]  # the normalisation of the transform: build_stream sets both
    std: tuple[float, ...]

    def __init__(self, shards: Sequence[str | Path], transform: Callable, batch_size: int, batches_per_epoch: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, channels: int = 3,
                 counts: list[int] | None = None):
        self.shards = [str(s) for s in shards]
        if not self.shards:
            raise ValueError("no shards to stream")
        self.transform, self.batch_size, self.batches_per_epoch = transform, batch_size, batches_per_epoch
        self.seed, self.rank, self.world_size, self.channels = seed, rank, world_size, channels
        self.mode = mode_of(channels)
        self.counts = counts if counts is not None else shard_counts(self.shards)
        self.epoch = self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Epoch ``epoch``, resumed after this rank's ``start_batch`` batches (0: from its start)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _reader(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return worker, workers

    def reader_shards(self, worker: int, workers: int) -> list[int]:
        """The shards reader (rank, worker) reads in this epoch, in order."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.shards), generator=g).tolist()
        readers = self.world_size * workers
        if len(order) < readers:
            raise ValueError(f"{len(order)} shard(s) for {self.world_size} process(es) x {workers} worker(s) = "
                             f"{readers} readers: write at least {readers} shards (a smaller --shard-size)")
        return order[self.rank * workers + worker::readers]

    def __iter__(self):
        worker, workers = self._reader()
        # The DataLoader takes batch k from worker k % workers. Resumed after start_batch batches, its first
        # batch must be the one reader start_batch % workers would have produced: the workers' roles turn.
        worker = (worker + self.start_batch) % workers
        mine = self.reader_shards(worker, workers)
        my_batches = len(range(worker, self.batches_per_epoch, workers))
        quota = my_batches * self.batch_size
        skip = len(range(worker, self.start_batch, workers)) * self.batch_size
        produced, skipped = 0, []
        passes = 0
        while produced < quota:
            for shard in mine:
                url = self.shards[shard]
                with _open(url) as handle:
                    try:
                        tar = tarfile.open(fileobj=handle, mode="r|")
                        position, last_key = 0, None
                        for info in tar:
                            if produced >= quota:
                                return
                            key, ext = split_key(info.name)
                            if not info.isfile() or ext.lower() not in _IMAGE_EXTS or key == last_key:
                                continue
                            last_key, pos = key, position
                            position += 1
                            if skip:
                                skip -= 1
                                produced += 1
                                continue
                            data = tar.extractfile(info).read()
                            uid = shard * 2**24 + pos
                            seed = sample_seed(self.seed, self.epoch, uid + passes * 2**40)
                            try:
                                opened = open_image(data) if getattr(self.transform, "takes_seed", False) \
                                    else decode(data, self.mode)
                                image = augment(self.transform, opened, seed)
                            except BadImage as exc:
                                skipped.append((f"{url.rsplit('/', 1)[-1]}:{info.name}", str(exc)))
                                continue
                            produced += 1
                            yield {"image": image, "index": uid, "skipped": skipped}
                            skipped = []
                    except tarfile.ReadError as exc:
                        raise ValueError(f"shard {url} is truncated or not a tar file ({exc})") from None
            passes += 1
            if passes > 1 and produced == 0:
                raise ValueError(f"no readable image in the shards of reader {self.rank}/{worker}")

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    @staticmethod
    def collate_fn(items: list[dict]) -> dict:
        """The DataLoader's ``collate_fn`` (as a map-style pretraining data set's)."""
        from mixmim.data.datasets import collate

        return collate(items)

    def finish_batch(self, batch: dict, device=None) -> dict:
        """Nothing to do on the device (the workers decode)."""
        return batch


def epoch_batches(counts: list[int], global_batch: int) -> int:
    """Steps per epoch of a stream: every image once, in whole global batches."""
    return max(1, math.floor(sum(counts) / global_batch))
