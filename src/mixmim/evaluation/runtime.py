"""What every transfer task needs at run time: the device, bf16 autocast on CUDA, seeding, frozen
feature extraction and classifier evaluation."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mixmim.evaluation.metrics import confusion_matrix, topk_correct


def pick_device(request: str = "auto") -> torch.device:
    if request == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(request)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {request}: CUDA is not available on this machine")
    return device


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (no loss scaling needed); full precision elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pooled_features(encoder: nn.Module, images: Tensor) -> Tensor:
    """Average of the last stage's tokens after the final norm (the classifier's pre-logits)."""
    return encoder.forward_head(encoder.forward_features(images), pre_logits=True)


@torch.no_grad()
def extract_features(encoder: nn.Module, loader: DataLoader, device: torch.device, amp: bool = True,
                     desc: str = "features", progress: bool = True) -> tuple[Tensor, Tensor]:
    """(N, C) float32 pooled features and (N,) labels of everything ``loader`` yields."""
    encoder.eval()
    feats, labels = [], []
    for images, targets in tqdm(loader, desc=desc, leave=False, disable=not progress):
        with autocast(device, amp):
            out = pooled_features(encoder, images.to(device, non_blocking=True))
        feats.append(out.float().cpu())
        labels.append(targets.cpu())
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int, amp: bool = True,
             progress: bool = True) -> dict:
    """Cross-entropy, top-1 and top-5 accuracy (percent) and the confusion matrix of ``model``."""
    model.eval()
    total, loss_sum, hits1, hits5 = 0, 0.0, 0, 0
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=not progress):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        c1, c5 = topk_correct(logits, targets, (1, 5))
        hits1, hits5, total = hits1 + c1, hits5 + c5, total + len(targets)
        matrix += confusion_matrix(logits.argmax(1).cpu(), targets.cpu(), num_classes)
    if total == 0:
        raise ValueError("the evaluation set is empty")
    return {"loss": loss_sum / total, "acc1": 100.0 * hits1 / total, "acc5": 100.0 * hits5 / total,
            "samples": total, "confusion": matrix}
