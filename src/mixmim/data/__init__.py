"""Data: image folders, Fashion-MNIST and bundled photos; robust decoding; resumable sampling."""

from __future__ import annotations

from mixmim.data.datasets import BundledPhotos, FashionMNISTImages, ImageFolderDataset, SeededDataset, collate
from mixmim.data.images import BadImage, load_rgb
from mixmim.data.sampler import ResumableSampler
from mixmim.data.transforms import pretrain_transform


def build_pretrain_dataset(data, img_size: int) -> SeededDataset:
    """The data set a :class:`~mixmim.config.DataConfig` names, with the pretraining augmentation."""
    transform = pretrain_transform(img_size, data.crop_scale, data.hflip, data.mean, data.std)
    if data.source == "folder":
        return ImageFolderDataset(data.path, transform)
    if data.source == "fashion_mnist":
        return FashionMNISTImages(transform, root=data.path)
    return BundledPhotos(transform, epoch_size=data.bundled_epoch_size)


__all__ = ["BadImage", "BundledPhotos", "FashionMNISTImages", "ImageFolderDataset", "ResumableSampler",
           "SeededDataset", "build_pretrain_dataset", "collate", "load_rgb", "pretrain_transform"]
