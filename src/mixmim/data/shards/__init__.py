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

- :mod:`~mixmim.data.shards.layout`: names and finding shard sets;
- :mod:`~mixmim.data.shards.index`: the member index and its cache;
- :mod:`~mixmim.data.shards.reader`: :class:`ShardSource`;
- :mod:`~mixmim.data.shards.writer`: ``mixmim shards``.
"""

from mixmim.data.shards.index import ShardEntry, index_shard, load_index
from mixmim.data.shards.layout import (
    IMAGE_EXTS,
    INDEX_NAME,
    INDEX_VERSION,
    SHARD_NAME,
    ShardError,
    parse_size,
    shard_files,
    shard_splits,
    split_key,
)
from mixmim.data.shards.reader import ShardSource
from mixmim.data.shards.writer import ShardReport, previous_shard_files, write_shard_set, write_shards

__all__ = ["IMAGE_EXTS", "INDEX_NAME", "INDEX_VERSION", "SHARD_NAME", "ShardEntry", "ShardError", "ShardReport",
           "ShardSource", "index_shard", "load_index", "parse_size", "previous_shard_files", "shard_files",
           "shard_splits", "split_key", "write_shard_set", "write_shards"]
