"""What a ``data:`` section (:class:`~mixmim.data.config.DataConfig`) names, built: the source at a path
(:func:`open_source`, the one place that tells a folder from shards or a Hugging Face dataset), the
normalisation, the pretraining augmentation, and the pretraining data set or stream."""

from __future__ import annotations

from pathlib import Path

from mixmim.data.config import DataConfig
from mixmim.data.datasets import BundledPhotos, FashionMNISTImages, SeededDataset, SourceDataset
from mixmim.data.sources import FolderSource, ImageSource
from mixmim.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALIZE,
    PretrainTransform,
    check_stats,
    imagenet_stats,
    pretrain_transform,
)

SOURCES = ("folder", "shards", "hf", "stream", "fashion_mnist", "bundled")


def open_source(path: str | Path, kind: str = "auto", hf_image_column: str = "image",
                hf_label_column: str | None = "label", labelled: bool = False) -> ImageSource:
    """The images at ``path``: ``kind`` folder / shards / hf, or ``auto`` (also what ``folder`` does, so that
    ``--data DIR`` takes any of them): a ``.tar`` file or a folder of ``*.tar`` is shards, a folder written
    by ``datasets`` (or of Parquet files) is a Hugging Face dataset (its training split), else a folder
    (``labelled``: one sub-folder per class). The one place that tells which kind of data a path holds."""
    from mixmim.data.shards import ShardSource, shard_files

    if kind not in ("auto", "folder", "shards", "hf"):
        raise ValueError(f"data.source={kind!r}: expected one of {', '.join(SOURCES)}")
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    if path.is_file() and path.suffix.lower() != ".tar":
        raise ValueError(f"--data {path} is a file, expected a folder of images (or a .tar shard)")
    shards = shard_files(path)
    if kind == "shards" or (kind in ("auto", "folder") and shards):
        if not shards:
            raise ValueError(f"data.source=shards: {path} is neither a .tar file nor a folder of .tar shards")
        return ShardSource(shards)
    from mixmim.data.hf import HFSource, is_hf_dataset, load_hf_splits

    if kind == "hf" or (kind in ("auto", "folder") and is_hf_dataset(path)):
        splits = load_hf_splits(path)
        split = "train" if "train" in splits else next(iter(splits))
        return HFSource(splits[split], hf_image_column, hf_label_column, f"{path}:{split}")
    return FolderSource(path, labelled=labelled)


def _given(value) -> tuple[float, ...] | None:
    return tuple(float(v) for v in value) if value is not None else None


def normalization(data: DataConfig, channels: int, dataset=None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a run normalises with: ``data.mean``/``data.std`` when set (one value per channel), else
    by ``data.normalize``: ImageNet's (its luma-weighted grey values for one channel), the data set's own
    (:func:`~mixmim.data.stats.dataset_stats` over ``data.stats_samples`` images of ``dataset``, seeded; a
    pretraining run stores the result as its ``data.mean``/``data.std``, which then win), or none (0 and 1:
    pixels in [0, 1])."""
    normalize = data.normalize
    if normalize not in NORMALIZE:
        raise ValueError(f"data.normalize={normalize!r}: expected one of {', '.join(NORMALIZE)}")
    mean, std = _given(data.mean), _given(data.std)
    if mean == IMAGENET_MEAN and std == IMAGENET_STD:
        mean = std = None  # the config's default, not a choice: channels and data.normalize decide
    if (mean is None) != (std is None):
        raise ValueError("data.mean and data.std go together: set both or neither")
    if mean is not None and std is not None:  # both or neither, checked above
        # With normalize=dataset, given statistics are the measurement a run made once and stored in its
        # config (resuming it must not measure again); with normalize=none they contradict it.
        if normalize == "none":
            raise ValueError("data.mean/data.std are set and data.normalize=none: pick one")
        return check_stats(mean, std, channels)
    if normalize == "none":
        return (0.0,) * channels, (1.0,) * channels
    if normalize == "dataset":
        from mixmim.data.stats import dataset_stats

        if dataset is None:
            raise ValueError("data.normalize=dataset needs the data set to measure")
        stats = dataset_stats(dataset, channels, data.stats_samples, seed=0)
        return check_stats(stats.mean, tuple(max(s, 1e-6) for s in stats.std), channels)
    return imagenet_stats(channels)


def _raw_dataset(data: DataConfig, channels: int) -> SeededDataset | ImageSource:
    """What the statistics of ``data.normalize=dataset`` are measured on (no transform needed)."""
    source = data.source
    if source == "fashion_mnist":
        return FashionMNISTImages(None, root=data.path, channels=channels)
    if source == "bundled":
        return BundledPhotos(None, channels=channels)
    return _raw_source(data)


def _raw_source(data: DataConfig) -> ImageSource:
    """The images of a folder, shards or Hugging Face ``data.source`` at ``data.path``."""
    if not data.path:  # DataConfig.validate refuses this first; a config built by hand is told here
        raise ValueError(f"data.source={data.source} needs data.path")
    return open_source(data.path, "auto" if data.source == "folder" else data.source,
                       data.hf_image_column, data.hf_label_column)


def build_transform(data: DataConfig, img_size: int, dataset=None) -> PretrainTransform:
    """The pretraining augmentation a :class:`~mixmim.config.DataConfig` describes."""
    channels = int(data.channels)
    mean, std = normalization(data, channels, dataset)
    return pretrain_transform(img_size, data.crop_scale, data.hflip, mean, std, channels,
                              data.draft, data.draft_margin)


def build_pretrain_dataset(data: DataConfig, img_size: int) -> SeededDataset:
    """The data set a :class:`~mixmim.config.DataConfig` names, with the pretraining augmentation.

    ``ds.mean``/``ds.std`` are the normalisation used (to store in the run's config: with
    ``data.normalize=dataset`` they are measured here). With ``data.decode=gpu`` the loop must use
    ``ds.collate_fn`` and call ``ds.finish_batch(batch, device)`` on each batch (every data set has both)."""
    source = data.source
    if source not in SOURCES:
        raise ValueError(f"data.source={source!r}: expected one of {', '.join(SOURCES)}")
    if source == "stream":
        raise ValueError("data.source=stream is an iterable data set: build it with mixmim.data.build_stream")
    channels = int(data.channels)
    raw = _raw_dataset(data, channels) if data.normalize == "dataset" else None
    transform = build_transform(data, img_size, raw)
    if source == "fashion_mnist":
        dataset: SeededDataset = FashionMNISTImages(transform, root=data.path, channels=channels)
    elif source == "bundled":
        dataset = BundledPhotos(transform, epoch_size=data.bundled_epoch_size, channels=channels)
    else:
        if not data.path:
            raise ValueError(f"data.source={source} needs data.path")
        found = raw if isinstance(raw, ImageSource) else _raw_source(data)  # neither fashion_mnist nor bundled
        dataset = SourceDataset(found, transform, channels)
    dataset.mean, dataset.std = transform.mean, transform.std
    if data.decode == "gpu":
        from mixmim.data.gpu import gpu_decoding

        dataset = gpu_decoding(dataset)
    elif data.decode != "cpu":
        raise ValueError(f"data.decode={data.decode!r}: expected cpu or gpu")
    return dataset


def build_stream(data: DataConfig, img_size: int, batch_size: int, global_batch: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
    """``data.source=stream``: a :class:`~mixmim.data.stream.ShardStream` over the shards at ``data.path``
    (a folder, or a text file listing one shard path or URL per line), ``batch_size`` per process per
    micro-batch; ``len(stream) // batch_size`` micro-batches per epoch on this rank."""
    from mixmim.data.shards import shard_files
    from mixmim.data.stream import ShardStream, epoch_batches, shard_counts

    path = str(data.path)
    if path.endswith(".txt") and Path(path).is_file():
        shards = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    else:
        shards = [str(p) for p in (shard_files(path) or [])]
    if not shards:
        raise ValueError(f"data.source=stream: {path} lists no shards (a folder of .tar or a .txt list)")
    counts = shard_counts(shards)
    transform = build_transform(data, img_size)
    steps = epoch_batches(counts, global_batch)
    per_rank_micro = steps * (global_batch // world_size) // batch_size
    stream = ShardStream(shards, transform, batch_size, per_rank_micro, seed, rank, world_size,
                         int(data.channels), counts)
    stream.mean, stream.std = transform.mean, transform.std
    return stream
