"""Pretraining augmentation (MixMIM section 8 / MAE): RandomResizedCrop, horizontal flip, ImageNet
normalisation. Nothing else: masking is the augmentation that matters."""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pretrain_transform(img_size: int, scale: Sequence[float] = (0.2, 1.0), hflip: bool = True,
                       mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    steps = [T.ToImage(),
             T.RandomResizedCrop(img_size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC, antialias=True)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
    return T.Compose(steps)


def view_transform(img_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    """Deterministic resize + centre crop, for pictures and ``mixmim reconstruct``."""
    return T.Compose([T.ToImage(), T.Resize(img_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                      T.CenterCrop(img_size), T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))])


def denormalize(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Normalised (B, 3, H, W) -> pixels in [0, 1]."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() * s + m).clamp(0, 1)
