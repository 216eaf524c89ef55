"""Convolution, max pooling and GroupNorm that never mix information across the images of a mixed input.

MixMIM supplement section 9 (Figure 4, "mixed convolution") pretrains convolutional encoders (ResNet-v2 BiT,
PVT v2's overlapping patch embedding and depth-wise convolution) on a mixed image, where each grid cell comes
from one of k images. An output position may only use input positions of its own image. The mixed
convolution extends partial convolution (Liu et al. 2018, "Image Inpainting for Irregular Holes Using Partial
Convolutions"): the input is masked to one image group, convolved, and rescaled by the share of the kernel
window that belongs to that group, so a position inside a cell sees the same statistics as in a plain conv.

A group map ``groups`` is an integer tensor (G, H, W) of values 0..k-1; G == 1 shares one map across the
batch, G == B gives one map per sample. Every function takes the timm (or torch) module itself and reuses its
parameters, so a module can be made group aware without changing its state-dict keys::

    x = self.conv(x)                         # before
    x = mixed_conv2d(self.conv, x, groups)   # after: same parameters, no new submodule

Cost: k image groups cost k convolutions (or poolings), run as one call on a k-times larger batch. Without
``num_groups`` the number of groups is read from ``groups.max()``, which synchronises with the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
from timm.layers.padding import pad_same
from torch import Tensor, nn

__all__ = ["downsample_groups", "mixed_conv2d", "mixed_max_pool2d", "mixed_group_norm"]

# A kernel size, stride, padding or dilation as modules hold them: one int, or one per side.
_Size = int | tuple[int, ...]


def _pair(v: _Size) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _check(x: Tensor, groups: Tensor, num_groups: int | None) -> int:
    if groups.dim() != 3 or groups.shape[0] not in (1, x.shape[0]) or groups.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"group map of shape {tuple(groups.shape)} does not fit input {tuple(x.shape)}: "
                         "expected (1 or B, H, W)")
    return int(groups.max()) + 1 if num_groups is None else num_groups


def _one_hot(groups: Tensor, k: int) -> Tensor:
    """(k, G, 1, H, W) boolean masks, laid out to broadcast against a (B, C, H, W) input."""
    return (groups.unsqueeze(0) == torch.arange(k, device=groups.device).view(k, 1, 1, 1)).unsqueeze(2)


def _pick(per_group: Tensor, out_groups: Tensor) -> Tensor:
    """Select from (k, B, C, H, W) the entry of each position's own group; a gather rather than a masked
    sum, so values of other groups (even inf) cannot leak in and their gradient is exactly zero."""
    _, b, c, h, w = per_group.shape
    index = out_groups.long().view(1, -1, 1, h, w).expand(1, b, c, h, w)
    return per_group.gather(0, index).squeeze(0)


def downsample_groups(groups: Tensor, out_hw: Sequence[int], stride: _Size) -> Tensor:
    """Group map (G, H_out, W_out) of a strided op: the group at each window's anchor ``groups[:, ::sh, ::sw]``.

    Group cells are aligned multiples of the stride, so the anchor and the kernel centre agree. The map is
    cropped to ``out_hw``; an op whose output is larger than the strided map raises a ValueError."""
    sh, sw = _pair(stride)
    out = groups[:, ::sh, ::sw]
    if out.shape[-2] < out_hw[0] or out.shape[-1] < out_hw[1]:
        raise ValueError(f"group map {tuple(groups.shape[-2:])} at stride {(sh, sw)} gives {tuple(out.shape[-2:])}, "
                         f"smaller than the output size {tuple(out_hw)}")
    return out[:, : out_hw[0], : out_hw[1]]


def _window_counts(conv: nn.Module, masks: Tensor) -> Tensor:
    """Number of in-bounds positions of each mask channel in every kernel window of ``conv``: a ones kernel
    with the conv's stride, padding and dilation. Zero padding is counted for nobody."""
    size, stride = _pair(cast(_Size, conv.kernel_size)), _pair(cast(_Size, conv.stride))
    dilation = _pair(getattr(conv, "dilation", 1))
    padding = cast("str | _Size", conv.padding)
    # timm's 'same' modules pad the input in forward, by an amount that depends on the input size
    if getattr(conv, "same_pad", False) or isinstance(conv, (Conv2dSame, Conv2dSameExport)):
        masks = pad_same(masks, list(size), list(stride), list(dilation))  # timm annotates lists (TorchScript)
        padding = 0
    ones = masks.new_ones(masks.shape[1], 1, *size)
    return F.conv2d(masks, ones, None, stride, padding, dilation, groups=masks.shape[1])


def mixed_conv2d(conv: nn.Module, x: Tensor, groups: Tensor | None, num_groups: int | None = None) -> Tensor:
    """Apply a 2-D convolution module so that each output position only sees its own image group.

    ``conv`` is an ``nn.Conv2d``, timm ``StdConv2d``/``StdConv2dSame``/``Conv2dSame`` or any module whose
    forward is a zero-padded 2-D convolution (depth-wise included). For each group g, ``y_g = conv(x masked
    to g)``; the bias-free part is scaled by n_valid / n_g (in-bounds window positions over those of group g,
    partial-convolution renormalisation) and each output position takes ``y_g`` of its own group
    (:func:`downsample_groups`). With ``groups=None`` this is exactly ``conv(x)``; with a single group it
    equals ``conv(x)`` up to rounding. Costs k convolutions (MixMIM supplement section 9, Figure 4).
    """
    if groups is None:
        return conv(x)
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        raise ValueError(f"mixed_conv2d needs zero padding, got padding_mode={conv.padding_mode!r}")
    k = _check(x, groups, num_groups)
    masks = _one_hot(groups, k)
    # torch.where rather than a product: a masked-out inf or nan must not become nan through 0 * inf
    ys = conv(torch.where(masks, x.unsqueeze(0), 0).flatten(0, 1))
    ys = ys.view(k, x.shape[0], *ys.shape[1:])
    out_groups = downsample_groups(groups, ys.shape[-2:], cast(_Size, conv.stride))

    # counts are small integers; keep them (and the division) out of low-precision autocast
    cdtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        n_g = _window_counts(conv, masks.squeeze(2).transpose(0, 1).to(cdtype))  # (G, k, H', W')
        n_valid = _window_counts(conv, x.new_ones(1, 1, *x.shape[-2:], dtype=cdtype))
    n_own = n_g.gather(1, out_groups.long().unsqueeze(1))
    scale = torch.where(n_own > 0, n_valid / n_own.clamp_min(1), 0)

    y = _pick(ys, out_groups)
    bias = getattr(conv, "bias", None)
    if bias is None:
        return (y * scale).to(y.dtype)
    bias = bias.view(1, -1, 1, 1)
    return ((y - bias) * scale + bias).to(y.dtype)


def mixed_max_pool2d(pool: nn.Module, x: Tensor, groups: Tensor | None, pad: nn.Module | None = None,
                     num_groups: int | None = None) -> Tensor:
    """Max pooling in which each output position only takes the maximum over its own image group.

    ``pool`` is an ``nn.MaxPool2d`` (its own padding is -inf) or timm's ``MaxPool2dSame``; ``pad`` is an
    optional module applied before it, such as BiT's fixed-padding stem ``nn.ConstantPad2d(1, 0.)``, whose
    zeros belong to every group just as in the plain op. Other groups' positions are set to -inf, so they
    never win the max. With ``groups=None`` this is ``pool(pad(x))``; with a single group it is identical.
    Costs k poolings (MixMIM supplement section 9)."""
    if groups is None:
        return pool(x if pad is None else pad(x))
    k = _check(x, groups, num_groups)
    xs = torch.where(_one_hot(groups, k), x.unsqueeze(0), float("-inf")).flatten(0, 1)
    ys = pool(xs if pad is None else pad(xs))
    ys = ys.view(k, x.shape[0], *ys.shape[1:])
    return _pick(ys, downsample_groups(groups, ys.shape[-2:], cast(_Size, pool.stride)))


def mixed_group_norm(norm: nn.GroupNorm, x: Tensor, groups: Tensor | None, num_groups: int | None = None) -> Tensor:
    """GroupNorm whose statistics never mix images: mean and biased variance per sample, channel group and
    image group (over the channel group's channels and that image's positions only), then the affine
    parameters and, for timm's ``GroupNormAct``, its drop and activation.

    With ``groups=None`` this is ``norm(x)``; with one image group everywhere it equals ``norm(x)`` to
    rounding. Statistics are computed in at least float32 (MixMIM supplement section 9)."""
    if groups is None:
        return norm(x)
    k = _check(x, groups, num_groups)
    b, c, h, w = x.shape
    n = norm.num_groups
    cdtype = torch.promote_types(x.dtype, torch.float32)
    xg = x.to(cdtype).view(b, n, c // n, h, w)
    masks = _one_hot(groups, k).unsqueeze(2)  # (k, G, 1, 1, H, W) against (B, n, C/n, H, W)
    count = (masks.sum((-3, -2, -1)) * (c // n)).clamp_min(1)  # empty groups: avoid 0 / 0

    def per_position(stat: Tensor) -> Tensor:  # (k, B, n) -> (B, n, 1, H, W), each position's own group
        return _pick(stat.unsqueeze(-1).unsqueeze(-1).expand(k, b, n, h, w), groups).unsqueeze(2)

    mean = torch.where(masks, xg, 0).sum((-3, -2, -1)) / count
    # two passes (centre, then square) as the plain op does, for accuracy when the mean is large
    d = xg - per_position(mean)
    var = torch.where(masks, d * d, 0).sum((-3, -2, -1)) / count
    y = (d * per_position(torch.rsqrt(var + norm.eps))).view(b, c, h, w)
    if norm.weight is not None:
        y = y * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    if not torch.is_autocast_enabled(x.device.type):
        # F.group_norm returns float32 under autocast and the input dtype otherwise
        y = y.to(x.dtype)
    for name in ("drop", "act"):  # timm's GroupNormAct order
        layer = getattr(norm, name, None)
        if layer is not None:
            y = layer(y)
    return y
