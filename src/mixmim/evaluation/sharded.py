"""Evaluation split over the processes of torchrun with no sample counted twice or dropped.

Process ``r`` of ``w`` takes items ``r, r + w, r + 2w, ...`` of the data set, padded by repeating the
last item so that every process runs the same number of batches (FSDP needs every process in every
forward); padded items carry weight 0 and are dropped when the shares are put back together. So the
counts summed over processes are exactly those of one process, the last uneven batch included.

Items are what the labelled data sets give: a dict with ``image`` and ``label`` (and ``index``,
``skipped``), or an ``(image, label)`` pair.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mixmim.evaluation.metrics import confusion_matrix, topk_correct

if TYPE_CHECKING:
    from mixmim.models.base import GroupedEncoder


class SizedDataset(Protocol):
    """A map-style data set with a length, what the evaluation reads (torch's ``Dataset`` type has no
    ``__len__``)."""

    def __len__(self) -> int: ...

    def __getitem__(self, key: Any, /) -> Any: ...


def world() -> tuple[int, int]:
    """(rank, world size) of this process (0, 1 outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Shard(Dataset):
    """This process's share of ``dataset``, padded to ``ceil(len / world)`` items; items are
    ``(image, label, valid)`` with ``valid`` 0 on padding (``label`` a class id, or a label map)."""

    def __init__(self, dataset: SizedDataset, rank: int, world_size: int):
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self.real = len(range(rank, len(dataset), world_size))
        self.length = math.ceil(len(dataset) / world_size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        index = self.rank + i * self.world_size
        valid = index < len(self.dataset)
        at = index if valid else len(self.dataset) - 1
        item = self.dataset[(at, at)]  # the seeded key: a dict that says which file it holds
        image, label = (item["image"], item["label"]) if isinstance(item, dict) else item
        if not (torch.is_tensor(label) and label.ndim):  # a class id; a segmentation mask stays a map
            label = int(label)
        # An unreadable file comes back as the next readable one (its "index" says which): a stand-in
        # weighs nothing, so no image is counted twice and no unreadable one is counted at all.
        stand_in = isinstance(item, dict) and "index" in item and int(item["index"]) != at
        return image, label, 1.0 if valid and not stand_in else 0.0


def sum_over_processes(tensor: Tensor) -> Tensor:
    """``tensor`` summed over the processes of torchrun (itself on one process)."""
    if world()[1] > 1:
        dist.all_reduce(tensor)
    return tensor


def shard_loader(dataset: SizedDataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    rank, world_size = world()
    return DataLoader(Shard(dataset, rank, world_size), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


def _gather_interleaved(x: Tensor, total: int) -> Tensor:
    """Every process's share back in dataset order: item j of rank r is dataset item r + j * world."""
    _, world_size = world()
    if world_size == 1:
        return x[:total]
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.stack(parts, 1).reshape(-1, *x.shape[1:])[:total]


@torch.no_grad()
def extract_features(encoder: nn.Module, dataset: SizedDataset, device: torch.device, batch_size: int = 256,
                     num_workers: int = 0, autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                     progress: bool = False, desc: str = "features") -> tuple[Tensor, Tensor]:
    """(N, C) float32 pooled features (the classifier's pre-logits) and (N,) labels of the whole
    ``dataset``, in its order, on every process; each process computes its share. Unreadable items
    are left out (N is the number of readable ones)."""
    from tqdm import tqdm

    was_training = encoder.training
    encoder.eval()
    feats, labels, weights = [], [], []
    try:
        for images, targets, weight in tqdm(shard_loader(dataset, batch_size, num_workers), desc=desc, leave=False,
                                            disable=not progress):
            with (autocast() if autocast else contextlib.nullcontext()):
                out = cast("GroupedEncoder", encoder).pooled_features(images.to(device, non_blocking=True))
            feats.append(out.float())
            labels.append(targets.to(device))
            weights.append(weight.to(device))
    finally:
        encoder.train(was_training)
    x, y, w = torch.cat(feats), torch.cat(labels), torch.cat(weights)
    keep = _gather_interleaved(w, len(dataset)) > 0  # without the stand-ins of unreadable files
    return _gather_interleaved(x, len(dataset))[keep], _gather_interleaved(y, len(dataset))[keep]


@dataclass
class Scores:
    """Classification results summed over processes: counts are exact integers."""

    samples: int
    correct1: int
    correct5: int
    loss_sum: float
    confusion: Tensor

    @property
    def acc1(self) -> float:
        return 100.0 * self.correct1 / max(self.samples, 1)

    @property
    def acc5(self) -> float:
        return 100.0 * self.correct5 / max(self.samples, 1)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.samples, 1)

    def as_dict(self) -> dict:
        return {"loss": self.loss, "acc1": self.acc1, "acc5": self.acc5, "samples": self.samples}


def score_logits(logits: Tensor, targets: Tensor, weight: Tensor, num_classes: int) -> Tensor:
    """(4 + C^2,) float64 sums for one batch: samples, top-1 and top-5 hits, cross-entropy, confusion."""
    keep = weight > 0
    logits, targets = logits[keep].float(), targets[keep]
    c1, c5 = topk_correct(logits, targets, (1, 5)) if len(targets) else (0, 0)
    loss = float(F.cross_entropy(logits, targets, reduction="sum")) if len(targets) else 0.0
    matrix = confusion_matrix(logits.argmax(1), targets, num_classes).flatten().double()
    head = torch.tensor([len(targets), c1, c5, loss], dtype=torch.float64, device=matrix.device)
    return torch.cat([head, matrix])


@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataset: SizedDataset, device: torch.device, num_classes: int,
                        batch_size: int = 256, num_workers: int = 0,
                        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                        progress: bool = False) -> Scores:
    """Top-1/top-5, cross-entropy and the confusion matrix of ``model`` on ``dataset``, every process
    scoring its share and the sums reduced, so every process gets the one-process numbers."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    total = torch.zeros(4 + num_classes**2, dtype=torch.float64, device=device)
    try:
        for images, targets, weight in tqdm(shard_loader(dataset, batch_size, num_workers), desc="eval", leave=False,
                                            disable=not progress):
            with (autocast() if autocast else contextlib.nullcontext()):
                logits = model(images.to(device, non_blocking=True))
            total += score_logits(logits, targets.to(device), weight.to(device), num_classes).to(device)
    finally:
        model.train(was_training)
    total = sum_over_processes(total).cpu()
    if int(total[0]) == 0:
        raise ValueError("the evaluation set is empty")
    return Scores(int(total[0]), int(total[1]), int(total[2]), float(total[3]),
                  total[4:].round().long().reshape(num_classes, num_classes))
