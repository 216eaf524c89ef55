"""Sliding-window inference of the ADE20K protocol (mmsegmentation's ``slide_inference``, BEiT's test
setting: 512 x 512 windows at a stride of 341): every pixel is covered, overlapping windows' logits are
averaged, and the result is resized to the image's original resolution before the argmax."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def window_corners(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(top, left, bottom, right) of mmsegmentation's grid: ``ceil((H - crop) / stride) + 1`` rows, the
    last window of each row and column pushed back inside the image."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    corners = []
    for r in range(rows):
        for c in range(cols):
            bottom, right = min(r * stride + crop, height), min(c * stride + crop, width)
            corners.append((max(bottom - crop, 0), max(right - crop, 0), bottom, right))
    return corners


@torch.no_grad()
def slide_logits(model: Callable[[Tensor], Tensor], image: Tensor, num_classes: int, crop: int, stride: int,
                 batch: int = 8) -> Tensor:
    """(C, H, W) logits of one normalised (3, H, W) image: ``model`` maps (N, 3, crop, crop) to (N, C,
    crop, crop); a window smaller than the crop (a small image) is zero-padded and its logits cut back."""
    _, height, width = image.shape
    corners = window_corners(height, width, crop, stride)
    total = image.new_zeros(num_classes, height, width, dtype=torch.float32)
    count = image.new_zeros(1, height, width, dtype=torch.float32)
    for start in range(0, len(corners), batch):
        chunk = corners[start:start + batch]
        windows = torch.stack([F.pad(image[:, t:b, le:r], (0, crop - (r - le), 0, crop - (b - t)))
                               for t, le, b, r in chunk])
        logits = model(windows).float()
        for (t, le, b, r), out in zip(chunk, logits):
            total[:, t:b, le:r] += out[:, :b - t, :r - le]
            count[:, t:b, le:r] += 1
    return total / count


def logits_at(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """(C, h, w) logits bilinearly resized to the original (H, W) (mmsegmentation resizes logits, not
    labels)."""
    return F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
