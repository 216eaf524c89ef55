"""Data: image folders, WebDataset shards, Hugging Face datasets, Fashion-MNIST and bundled photos; robust
decoding; resumable sampling; a loader that decodes no more pixels than the crop needs.

The ``data:`` section of a run config is :class:`~mixmim.data.config.DataConfig` (no torch); what it
names is built by :mod:`mixmim.data.build`. The names below are imported on first use, so reading a
config loads no torch.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "DataConfig": "mixmim.data.config",
    "SOURCES": "mixmim.data.build", "build_pretrain_dataset": "mixmim.data.build", "build_stream": "mixmim.data.build",
    "build_transform": "mixmim.data.build", "normalization": "mixmim.data.build", "open_source": "mixmim.data.build",
    "BundledPhotos": "mixmim.data.datasets", "FashionMNISTImages": "mixmim.data.datasets",
    "ImageFolderDataset": "mixmim.data.datasets", "SeededDataset": "mixmim.data.datasets",
    "SourceDataset": "mixmim.data.datasets", "collate": "mixmim.data.datasets",
    "BadImage": "mixmim.data.images", "load_rgb": "mixmim.data.images", "ResumableSampler": "mixmim.data.sampler",
    "pretrain_transform": "mixmim.data.transforms",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mixmim.data' has no attribute {name!r}")
