"""Images <-> rows of patches, and the reconstruction target and loss every pixel-regressing method
shares: MAE's normalised-pixel target (``norm_pix_loss``, used by MixMIM section 2.2 and MixedAE) and
the mean squared error over the hidden patches (MAE; MixMIM eq. 2; MixedAE eq. 4)."""

from __future__ import annotations

import torch
from torch import Tensor


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, L, patch*patch*C), each row in (row, column, channel) order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: Tensor, patch: int, grid: tuple[int, int], channels: int = 3) -> Tensor:
    """Inverse of :func:`patchify`: (B, L, patch*patch*C) -> (B, C, H, W)."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * patch, gw * patch)


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-patch standardisation over all values of the patch (MAE's norm_pix_loss target; the
    variance is the unbiased estimate, as in MAE's code and the MixMIM release)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def patch_targets(images: Tensor, patch: int, norm_pix: bool) -> Tensor:
    """(B, L, patch*patch*C) what each patch of each image is to be predicted as: its pixels, or
    its pixels normalised per patch (``norm_pix``)."""
    target = patchify(images, patch)
    return normalize_patches(target) if norm_pix else target


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32 when it is half precision (bf16/fp16 under autocast), as it is otherwise: a
    loss is summed in at least float32, and float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_mse(prediction: Tensor, target: Tensor, hidden: Tensor) -> Tensor:
    """Mean squared error over every value of the hidden patches: ``prediction``/``target`` (S, L, P),
    ``hidden`` (S, L) bool; each patch's error is its mean over P values, averaged over the hidden
    patches of all sequences (MAE's ``forward_loss``; MixMIM eq. 2; MixedAE eq. 4)."""
    per_patch = (at_least_float32(prediction) - at_least_float32(target)).pow(2).mean(dim=-1)
    weight = hidden.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp(min=1)
